//! The name map against the real-architecture layouts (SD 1.5, BK-SDM, SD VAE, CLIP ViT-L/14):
//! diffusers names are turned into LDM names by an independent inverse (written the way
//! diffusers' diffusers->LDM script numbers blocks), mapped back, and compared with shapes.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::testutil::{f32_bytes, layout, safetensors_file};

type Shapes = BTreeMap<String, Vec<usize>>;

fn ldm_resnet(rest: &str) -> String {
    let table = [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ];
    let (new, old) = table.iter().find(|(new, _)| rest.starts_with(new)).unwrap();
    format!("{old}{}", &rest[new.len()..])
}

/// diffusers UNet name -> LDM name, with `slots` input/output blocks per level
/// (layers_per_block + 1 in LDM's own numbering; 3 in diffusers' script whatever the model).
fn ldm_unet(name: &str, slots: usize, up_with_attention: &BTreeSet<usize>) -> String {
    let top = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    if let Some((new, old)) = top.iter().find(|(new, _)| name.starts_with(new)) {
        return format!("{old}{}", &name[new.len()..]);
    }
    let (group, rest) = name.split_once('.').unwrap();
    if group == "mid_block" {
        let (kind, rest) = rest.split_once('.').unwrap();
        let (k, r) = split_index(rest).unwrap();
        return match kind {
            "resnets" => format!("middle_block.{}.{}", 2 * k, ldm_resnet(r)),
            _ => format!("middle_block.1.{r}"),
        };
    }
    let (b, rest) = split_index(rest).unwrap();
    let (kind, rest) = rest.split_once('.').unwrap();
    let (l, r) = split_index(rest).unwrap();
    match (group, kind) {
        ("down_blocks", "resnets") => {
            format!("input_blocks.{}.0.{}", 1 + b * slots + l, ldm_resnet(r))
        }
        ("down_blocks", "attentions") => format!("input_blocks.{}.1.{r}", 1 + b * slots + l),
        ("down_blocks", "downsamplers") => {
            format!("input_blocks.{}.0.op.{}", (b + 1) * slots, r.strip_prefix("conv.").unwrap())
        }
        ("up_blocks", "resnets") => format!("output_blocks.{}.0.{}", b * slots + l, ldm_resnet(r)),
        ("up_blocks", "attentions") => format!("output_blocks.{}.1.{r}", b * slots + l),
        ("up_blocks", "upsamplers") => {
            let j = if up_with_attention.contains(&b) { 2 } else { 1 };
            format!("output_blocks.{}.{j}.{r}", b * slots + slots - 1)
        }
        _ => panic!("unexpected UNet tensor {name}"),
    }
}

/// diffusers VAE name and shape -> LDM name and shape.
fn ldm_vae(name: &str, shape: &[usize], levels: usize) -> (String, Vec<usize>) {
    let Some((side, rest)) = name.split_once('.').filter(|(s, _)| *s == "encoder" || *s == "decoder") else {
        return (name.to_owned(), shape.to_vec());
    };
    let resnet = |r: &str| r.replace("conv_shortcut.", "nin_shortcut.");
    let mut shape = shape.to_vec();
    let ldm = if let Some(r) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{r}")
    } else if let Some(r) = rest.strip_prefix("mid_block.resnets.") {
        let (k, r) = split_index(r).unwrap();
        format!("mid.block_{}.{}", k + 1, resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let (module, param) = r.rsplit_once('.').unwrap();
        let module = match module {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => panic!("unexpected VAE attention tensor {name}"),
        };
        if module != "norm" && param == "weight" {
            shape.extend([1, 1]);
        }
        format!("mid.attn_1.{module}.{param}")
    } else if let Some(r) = rest.strip_prefix("down_blocks.") {
        let (i, r) = split_index(r).unwrap();
        match r.strip_prefix("downsamplers.0.") {
            Some(r) => format!("down.{i}.downsample.{r}"),
            None => format!("down.{i}.block.{}", resnet(r.strip_prefix("resnets.").unwrap())),
        }
    } else if let Some(r) = rest.strip_prefix("up_blocks.") {
        let (i, r) = split_index(r).unwrap();
        let i = levels - 1 - i;
        match r.strip_prefix("upsamplers.0.") {
            Some(r) => format!("up.{i}.upsample.{r}"),
            None => format!("up.{i}.block.{}", resnet(r.strip_prefix("resnets.").unwrap())),
        }
    } else {
        rest.to_owned()
    };
    (format!("{side}.{ldm}"), shape)
}

/// Builds an LDM key list from the layouts, plans it, and checks every layout key comes back
/// once with its shape (after the planned squeeze), and nothing else.
fn round_trip(unet_layout: &str, slots: usize, old_text_keys: bool, layers_per_block: usize) {
    let (unet, text, vae) = (layout(unet_layout), layout("text_encoder_clip_vit_l14.json"), layout("vae_sd15.json"));
    let up_with_attention: BTreeSet<usize> =
        unet.keys().filter_map(|k| split_index(k.strip_prefix("up_blocks.")?)).filter(|(_, r)| r.starts_with("attentions.")).map(|(b, _)| b).collect();
    let vae_levels = layout("vae_sd15.json").keys().filter(|k| k.starts_with("decoder.up_blocks.") && k.ends_with("resnets.0.conv1.weight")).count();
    let mut ldm: Shapes = BTreeMap::new();
    for (name, shape) in &unet {
        ldm.insert(format!("{UNET}{}", ldm_unet(name, slots, &up_with_attention)), shape.clone());
    }
    for (name, shape) in &text {
        let name = if old_text_keys { name.strip_prefix("text_model.").unwrap() } else { name };
        ldm.insert(format!("{TEXT}{name}"), shape.clone());
    }
    for (name, shape) in &vae {
        let (name, shape) = ldm_vae(name, shape, vae_levels);
        ldm.insert(format!("{VAE}{name}"), shape);
    }
    let extras = ["betas", "model_ema.decay", "cond_stage_model.transformer.text_model.embeddings.position_ids", "some.unknown.key"];
    let plan = plan_keys(ldm.keys().map(String::as_str).chain(extras)).unwrap();
    assert_eq!(plan.layers_per_block, layers_per_block);
    assert_eq!(plan.unused, ["some.unknown.key"]);
    let mut got: [Shapes; 3] = Default::default();
    for (key, (part, name, squeeze)) in &plan.renames {
        let shape = if *squeeze { squeeze_1x1(&ldm[key]).unwrap() } else { ldm[key].clone() };
        assert!(got[*part as usize].insert(name.clone(), shape).is_none());
    }
    let [got_unet, got_text, got_vae] = got;
    assert_eq!(got_unet, unet, "{unet_layout}");
    assert_eq!(got_text, text);
    assert_eq!(got_vae, vae);
}

#[test]
fn sd15_layouts_round_trip() {
    round_trip("unet_sd15.json", 3, false, 2);
}

#[test]
fn sd15_with_old_text_encoder_keys() {
    round_trip("unet_sd15.json", 3, true, 2);
}

/// BK-SDM in LDM's own numbering (2 blocks per level) and in the gapped numbering of diffusers'
/// conversion script (3 per level, an upsampler-only output block).
#[test]
fn bk_sdm_layouts_round_trip_in_both_numberings() {
    for unet in ["unet_bk_sdm_tiny.json", "unet_bk_sdm_small.json"] {
        round_trip(unet, 2, false, 1);
        round_trip(unet, 3, true, 1);
    }
}

#[test]
fn split_index_reads_digits_only() {
    assert_eq!(split_index("12.rest.x"), Some((12, "rest.x")));
    for s in ["+1.a", ".a", "1", "x.a", "1e2.a"] {
        assert_eq!(split_index(s), None, "{s}");
    }
}

#[test]
fn missing_components_are_named() {
    let e = plan_keys(["first_stage_model.quant_conv.weight", "cond_stage_model.transformer.x"]).err().unwrap();
    assert!(e.starts_with("no UNet tensors (model.diffusion_model.*)"), "{e}");
    let e = plan_keys(["model.diffusion_model.time_embed.0.weight"]).err().unwrap();
    assert!(e.starts_with("no text encoder tensors"), "{e}");
    // Later families are named.
    let e = plan_keys(["model.diffusion_model.time_embed.0.weight", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"]).err().unwrap();
    assert!(e.starts_with("an SD 2.x checkpoint"), "{e}");
    let e = plan_keys(["model.diffusion_model.time_embed.0.weight", "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"]).err().unwrap();
    assert!(e.starts_with("an SDXL checkpoint"), "{e}");
}

#[test]
fn colliding_names_are_an_error() {
    let keys = [
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight",
        "model.diffusion_model.output_blocks.0.0.in_layers.0.weight",
        "model.diffusion_model.output_blocks.1.0.in_layers.0.weight",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        "cond_stage_model.transformer.final_layer_norm.weight",
        "first_stage_model.quant_conv.weight",
    ];
    let e = plan_keys(keys).err().unwrap();
    assert!(e.contains("would both be text_model.final_layer_norm.weight"), "{e}");
}

/// A minimal checkpoint: one UNet level, a text encoder weight, and the VAE attention.
fn tiny_checkpoint(extra: &[(&str, &str, &[usize], Vec<u8>)]) -> Rc<WeightFile> {
    let zeros = |n: usize| f32_bytes(&vec![0.0; n]);
    let mut tensors: Vec<(&str, &str, &[usize], Vec<u8>)> = vec![
        ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", "F32", &[2], zeros(2)),
        ("model.diffusion_model.output_blocks.0.0.in_layers.0.weight", "F32", &[2], zeros(2)),
        ("model.diffusion_model.output_blocks.1.0.in_layers.0.weight", "F32", &[2], zeros(2)),
        ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "F16", &[2], vec![0; 4]),
        ("cond_stage_model.transformer.text_model.embeddings.position_ids", "I64", &[1, 2], vec![0; 16]),
        ("first_stage_model.encoder.mid.attn_1.q.weight", "F32", &[2, 2, 1, 1], f32_bytes(&[1.0, 2.0, 3.0, 4.0])),
        ("alphas_cumprod", "F32", &[1], zeros(1)),
        ("extra.unknown", "F32", &[1], zeros(1)),
    ];
    tensors.extend(extra.iter().cloned());
    Rc::new(WeightFile::from_bytes("ckpt.safetensors", safetensors_file(&tensors, None)).unwrap())
}

#[test]
fn split_renames_reshapes_and_reports_leftovers() {
    let single = split_single_file(tiny_checkpoint(&[])).unwrap();
    assert_eq!(single.layers_per_block, 1);
    assert_eq!(single.unused, ["extra.unknown"]);
    assert_eq!(single.unet.keys().collect::<Vec<_>>(), ["down_blocks.0.resnets.0.norm1.weight", "up_blocks.0.resnets.0.norm1.weight", "up_blocks.0.resnets.1.norm1.weight"]);
    assert_eq!(single.text_encoder.keys().collect::<Vec<_>>(), ["text_model.final_layer_norm.weight"]);
    assert_eq!(single.text_encoder.dtype("text_model.final_layer_norm.weight"), Some(crate::DType::F16));
    let q = "encoder.mid_block.attentions.0.to_q.weight";
    assert_eq!(single.vae.shape(q), Some(vec![2, 2]));
    let t = single.vae.load_f32(q).unwrap();
    assert_eq!((t.shape, t.data), (vec![2, 2], vec![1.0, 2.0, 3.0, 4.0]));
    assert_eq!(single.vae.file_name(), "ckpt.safetensors");
    let e = single.vae.load_f32("decoder.nope").unwrap_err().to_string();
    assert_eq!(e, "ckpt.safetensors: no tensor decoder.nope");
}

#[test]
fn split_errors_name_file_and_tensor() {
    let bad_shape = [("first_stage_model.decoder.mid.attn_1.k.weight", "F32", &[2usize, 2, 3, 3][..], vec![0; 144])];
    let e = split_single_file(tiny_checkpoint(&bad_shape)).err().unwrap().to_string();
    assert_eq!(
        e,
        "ckpt.safetensors: tensor first_stage_model.decoder.mid.attn_1.k.weight: \
         decoder.mid_block.attentions.0.to_k.weight must be a 1x1 convolution or linear weight, \
         found shape [2, 2, 3, 3]"
    );
    let int_weight = [("first_stage_model.quant_conv.weight", "I32", &[1usize][..], vec![0; 4])];
    let e = split_single_file(tiny_checkpoint(&int_weight)).err().unwrap().to_string();
    assert_eq!(
        e,
        "ckpt.safetensors: tensor first_stage_model.quant_conv.weight has dtype I32; \
         only F32, F16 and BF16 can be loaded"
    );
    let bytes = safetensors_file(&[("x", "F32", &[1], f32_bytes(&[0.0]))], None);
    let file = Rc::new(WeightFile::from_bytes("lora.safetensors", bytes).unwrap());
    let e = split_single_file(file).err().unwrap().to_string();
    assert!(e.starts_with("lora.safetensors: no UNet tensors"), "{e}");
}
