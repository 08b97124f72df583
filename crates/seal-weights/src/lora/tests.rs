//! The fixture LoRAs (one rank-4 LoRA made with peft over tiny-clean, saved by diffusers in
//! three layouts), round trips through every writer, stacking, and refused input.

use std::collections::BTreeMap;

use super::ldm::UnetLayout;
use super::*;
use crate::testutil::{f32_bytes, fixtures, safetensors_file};
use crate::{DType, Tensor32, WeightFile};
use LoraComponent::{TextEncoder, Unet};

/// tiny-clean's Linear and Conv2d layers, as the model crate passes them: every `.weight` of
/// a 2-D or 4-D tensor.
fn model() -> ModelPaths {
    let paths = |file: &str| -> BTreeMap<String, Vec<usize>> {
        let f = WeightFile::open(&fixtures().join("tiny-clean").join(file)).unwrap();
        f.keys()
            .filter_map(|k| {
                let shape = &f.info(k)?.shape;
                let path = k.strip_suffix(".weight")?;
                matches!(shape.len(), 2 | 4).then(|| (path.to_owned(), shape.clone()))
            })
            .collect()
    };
    ModelPaths { unet: paths("unet/diffusion_pytorch_model.safetensors"), text_encoder: paths("text_encoder/model.safetensors") }
}

fn fixture(layout: &str) -> LoraFile {
    let path = fixtures().join(format!("lora/weak_lora_{layout}.safetensors"));
    parse_lora(&WeightFile::open(&path).unwrap(), &model()).unwrap()
}

fn reparse(bytes: Vec<u8>) -> LoraFile {
    let file = WeightFile::from_bytes("written.safetensors", bytes).unwrap();
    parse_lora(&file, &model()).unwrap()
}

/// F32 tensors (key, shape, values) and optional metadata JSON -> a parse result.
fn parse_tensors(tensors: &[(String, Vec<usize>, Vec<f32>)], metadata: Option<&str>) -> Result<LoraFile, LoraError> {
    let spec: Vec<_> = tensors.iter().map(|(k, s, v)| (k.as_str(), "F32", s.as_slice(), f32_bytes(v))).collect();
    let file = WeightFile::from_bytes("test.safetensors", safetensors_file(&spec, metadata)).unwrap();
    parse_lora(&file, &model())
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `scale * up @ down` over the flattened kernel, on the host.
fn delta(m: &LoraModule) -> Vec<f32> {
    let (r, out) = (m.rank(), m.up.shape[0]);
    let cols = m.down.data.len() / r;
    let mut d = vec![0.0; out * cols];
    for o in 0..out {
        for k in 0..r {
            let u = m.up.data[o * r + k];
            for j in 0..cols {
                d[o * cols + j] += u * m.down.data[k * cols + j];
            }
        }
    }
    d.iter().map(|v| v * m.scale()).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs().max(y.abs())), "{what}[{i}]: {x} vs {y}");
    }
}

/// Same targets, and per target the same delta.
fn assert_same_deltas(a: &LoraFile, b: &LoraFile) {
    assert!(a.modules.keys().eq(b.modules.keys()));
    for (target, m) in &a.modules {
        assert_close(&delta(m), &delta(&b.modules[target]), &target.to_string());
    }
}

/// Tensors and scales equal (alphas may be stated differently for the same scale).
fn assert_same_tensors(a: &LoraFile, b: &LoraFile) {
    assert!(a.modules.keys().eq(b.modules.keys()));
    for (target, m) in &a.modules {
        let n = &b.modules[target];
        assert_eq!((&m.down, &m.up), (&n.down, &n.up), "{target}");
        assert_eq!(m.scale(), n.scale(), "{target}");
    }
}

fn attn(path: &str) -> LoraTarget {
    LoraTarget::new(Unet, path)
}

const TO_K: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k";
const KOHYA_TO_K: &str = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";

#[test]
fn the_three_fixture_layouts_hold_the_same_lora() {
    let (kohya, peft, legacy) = (fixture("kohya"), fixture("peft"), fixture("diffusers"));
    assert_eq!(kohya.format, LoraFormat::Kohya);
    assert_eq!(peft.format, LoraFormat::Peft);
    assert_eq!(legacy.format, LoraFormat::DiffusersLegacy);
    // q/k/v/out of attn1 and attn2 in 6 transformer blocks; q/k/v/out of 5 CLIP layers.
    let count = |l: &LoraFile, c| l.modules.keys().filter(|t| t.component == c).count();
    assert_eq!((count(&kohya, Unet), count(&kohya, TextEncoder)), (48, 20));
    for lora in [&kohya, &peft, &legacy] {
        assert_eq!(lora.dtype, DType::F32);
        for (target, m) in &lora.modules {
            assert_eq!((m.rank(), m.scale()), (4, 1.0), "{target}");
        }
    }
    // Alpha 4 is stored only by kohya; the diffusers layouts mean scale 1 by having none.
    assert!(kohya.modules.values().all(|m| m.alpha == Some(4.0)));
    assert!(peft.modules.values().chain(legacy.modules.values()).all(|m| m.alpha.is_none()));
    assert_eq!(kohya.metadata["ss_network_dim"], "4");
    assert_eq!(kohya.metadata["ss_network_alpha"], "4");
    assert_eq!(kohya.metadata["ss_network_module"], "networks.lora");
    assert_eq!(peft.metadata["format"], "pt");
    assert_same_deltas(&kohya, &peft);
    assert_same_deltas(&kohya, &legacy);
    let m = &kohya.modules[&attn(TO_K)];
    assert_eq!((m.down.shape.as_slice(), m.up.shape.as_slice()), ([4, 32].as_slice(), [64, 4].as_slice()));
}

/// The attention-processor naming (`attn1.processor.to_out_lora.down.weight`, text encoder
/// `self_attn.to_q_lora...`), built from the peft fixture's tensors.
#[test]
fn processor_names_read_as_the_same_lora() {
    let peft = fixture("peft");
    let mut tensors = Vec::new();
    for (target, m) in &peft.modules {
        let (parent, layer) = target.path.rsplit_once('.').unwrap();
        let name = match target.component {
            Unet => {
                let (parent, projection) = match parent.strip_suffix(".to_out") {
                    Some(attn) => (attn, "to_out"),
                    None => (parent, layer),
                };
                format!("unet.{parent}.processor.{projection}_lora")
            }
            TextEncoder => {
                let projection = format!("to_{}", layer.strip_suffix("_proj").unwrap());
                format!("text_encoder.{parent}.{projection}_lora")
            }
        };
        tensors.push((format!("{name}.down.weight"), m.down.shape.clone(), m.down.data.clone()));
        tensors.push((format!("{name}.up.weight"), m.up.shape.clone(), m.up.data.clone()));
    }
    let lora = parse_tensors(&tensors, None).unwrap();
    assert_eq!(lora.format, LoraFormat::DiffusersLegacy);
    assert_eq!(lora.modules, peft.modules);
}

#[test]
fn kohya_round_trip_is_exact() {
    let kohya = fixture("kohya");
    let again = reparse(write_kohya(&kohya).unwrap());
    assert_eq!(again, kohya);
}

#[test]
fn peft_and_legacy_round_trips() {
    for (layout, write) in [("peft", write_peft as fn(&LoraFile) -> Result<Vec<u8>, LoraError>), ("diffusers", write_diffusers_legacy)] {
        let lora = fixture(layout);
        let again = reparse(write(&lora).unwrap());
        assert_eq!(again.format, lora.format, "{layout}");
        assert_same_tensors(&lora, &again);
        // The written config states alpha = rank for every module.
        assert!(again.modules.values().all(|m| m.alpha == Some(4.0)));
    }
}

#[test]
fn write_in_format_keeps_each_layout() {
    for layout in ["kohya", "peft", "diffusers"] {
        let lora = fixture(layout);
        let again = reparse(write_in_format(&lora).unwrap());
        assert_eq!(again.format, lora.format, "{layout}");
        assert_same_tensors(&lora, &again);
    }
}

/// Written files are what the reference safetensors reader expects, metadata included.
#[test]
fn written_files_read_with_the_reference_reader() {
    let lora = fixture("kohya");
    for bytes in [write_kohya(&lora).unwrap(), write_peft(&lora).unwrap(), write_diffusers_legacy(&lora).unwrap()] {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert!(st.len() >= 136);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["ss_network_dim"], "4");
    }
}

/// diffusers reads a peft file's alphas only from its config, ComfyUI only from `.alpha`
/// tensors: the writer folds each scale into `up` so both apply the same delta.
#[test]
fn diffusers_layouts_fold_scales_and_state_alpha_as_rank() {
    let mut lora = fixture("kohya");
    lora.modules.get_mut(&attn(TO_K)).unwrap().alpha = Some(8.0);
    for bytes in [write_peft(&lora).unwrap(), write_diffusers_legacy(&lora).unwrap()] {
        let file = WeightFile::from_bytes("w", bytes).unwrap();
        assert!(file.keys().all(|k| !k.ends_with(".alpha")));
        let config: serde_json::Value = serde_json::from_str(&file.metadata()["lora_adapter_metadata"]).unwrap();
        for c in ["unet", "text_encoder"] {
            assert_eq!(config[format!("{c}.r")], 4);
            assert_eq!(config[format!("{c}.lora_alpha")], 4);
        }
        assert_eq!(config["unet.target_modules"].as_array().unwrap().len(), 48);
        let again = parse_lora(&file, &model()).unwrap();
        assert_eq!(again.modules[&attn(TO_K)].scale(), 1.0);
        assert_same_deltas(&lora, &again);
    }
    // Back to kohya: the stale config is dropped (diffusers would prefer it to the tensors).
    let peft = reparse(write_peft(&lora).unwrap());
    let file = WeightFile::from_bytes("k", write_kohya(&peft).unwrap()).unwrap();
    assert!(!file.metadata().contains_key("lora_adapter_metadata"));
    assert_eq!(file.load_f32(&format!("{KOHYA_TO_K}.alpha")).unwrap().data, [4.0]);
}

#[test]
fn half_precision_files() {
    for dtype in [DType::F16, DType::BF16] {
        let mut lora = fixture("kohya");
        lora.dtype = dtype;
        for bytes in [write_kohya(&lora).unwrap(), write_peft(&lora).unwrap()] {
            let again = reparse(bytes);
            assert_eq!(again.dtype, dtype);
            for (target, m) in &lora.modules {
                let round = |t: &Tensor32| -> Vec<f32> {
                    t.data
                        .iter()
                        .map(|&v| match dtype {
                            DType::F16 => half::f16::from_f32(v).to_f32(),
                            _ => half::bf16::from_f32(v).to_f32(),
                        })
                        .collect()
                };
                let n = &again.modules[target];
                assert_eq!(n.down.data, round(&m.down), "{target}");
                assert_eq!(n.up.data, round(&m.up), "{target}");
                assert_eq!(n.scale(), 1.0);
            }
        }
    }
}

#[test]
fn peft_alphas_from_tensors_and_config() {
    let te = "text_model.encoder.layers.0.self_attn.q_proj";
    let other = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let module = |prefix: &str, out: usize, inp: usize| {
        vec![(format!("{prefix}.lora_A.weight"), vec![4, inp], values(4 * inp, 1)), (format!("{prefix}.lora_B.weight"), vec![out, 4], values(4 * out, 2))]
    };
    let mut tensors = [module(&format!("unet.{TO_K}"), 64, 32), module(&format!("unet.{other}"), 64, 64), module(&format!("text_encoder.{te}"), 32, 32)].concat();
    let config = r#"{"lora_adapter_metadata": "{\"unet.lora_alpha\": 2, \"unet.alpha_pattern\": {\"attn2.to_k\": 6}, \"text_encoder.r\": 4}"}"#;
    let lora = parse_tensors(&tensors, Some(config)).unwrap();
    assert_eq!(lora.modules[&attn(TO_K)].alpha, Some(6.0));
    assert_eq!(lora.modules[&attn(other)].alpha, Some(2.0));
    // A config without lora_alpha means peft's default, 8.
    assert_eq!(lora.modules[&LoraTarget::new(TextEncoder, te)].alpha, Some(8.0));
    // An alpha tensor (diffusers' network_alphas naming) wins over the config.
    tensors.push((format!("unet.{TO_K}.alpha"), vec![], vec![1.0]));
    let lora = parse_tensors(&tensors, Some(config)).unwrap();
    assert_eq!(lora.format, LoraFormat::Peft);
    assert_eq!(lora.modules[&attn(TO_K)].scale(), 0.25);
    assert_eq!(lora.modules[&attn(other)].alpha, Some(2.0));
    assert!(parse_tensors(&tensors, None).unwrap().modules[&attn(other)].alpha.is_none());
    for bad in [
        r#"{"lora_adapter_metadata": "[1]"}"#,
        r#"{"lora_adapter_metadata": "{\"unet.lora_alpha\": \"8\"}"}"#,
        r#"{"lora_adapter_metadata": "{\"unet.alpha_pattern\": [1]}"}"#,
        r#"{"lora_adapter_metadata": "{\"unet.use_rslora\": 1}"}"#,
    ] {
        let e = parse_tensors(&tensors, Some(bad)).unwrap_err();
        assert!(matches!(e, LoraError::Metadata { .. }), "{bad}: {e}");
        assert!(e.to_string().starts_with("test.safetensors: metadata lora_adapter_metadata"));
    }
}

/// LoCon: 3x3 and 1x1 convolutions; a missing alpha means scale 1.
#[test]
fn kohya_convolutions() {
    let conv = "down_blocks.0.resnets.0.conv1"; // [32, 32, 3, 3]
    let proj = "down_blocks.1.attentions.0.proj_in"; // [64, 64, 1, 1]
    let tensors = [
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight".to_string(), vec![2, 32, 3, 3], values(576, 3)),
        ("lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight".to_string(), vec![32, 2, 1, 1], values(64, 4)),
        ("lora_unet_down_blocks_0_resnets_0_conv1.alpha".to_string(), vec![], vec![1.0]),
        // A linear-shaped LoRA on a 1x1 convolution.
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight".to_string(), vec![2, 64], values(128, 5)),
        ("lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight".to_string(), vec![64, 2], values(128, 6)),
    ];
    let lora = parse_tensors(&tensors, None).unwrap();
    let c = &lora.modules[&attn(conv)];
    assert_eq!((c.down.shape.clone(), c.up.shape.clone()), (vec![2, 32, 3, 3], vec![32, 2, 1, 1]));
    assert_eq!(c.scale(), 0.5);
    let p = &lora.modules[&attn(proj)];
    assert_eq!((p.down.shape.clone(), p.up.shape.clone()), (vec![2, 64, 1, 1], vec![64, 2, 1, 1]));
    assert_eq!((p.alpha, p.scale()), (None, 1.0));
    assert_eq!(reparse(write_kohya(&lora).unwrap()).modules[&attn(proj)].alpha, Some(2.0));
    assert_same_deltas(&lora, &reparse(write_peft(&lora).unwrap()));
}

/// Kohya files named after the LDM model (`lora_unet_input_blocks_4_1_...`) map onto the
/// same modules.
#[test]
fn kohya_files_with_ldm_names() {
    let kohya = fixture("kohya");
    let layout = UnetLayout::of(&model().unet).unwrap();
    let mut tensors = Vec::new();
    for (target, m) in &kohya.modules {
        let path = match target.component {
            Unet => format!("lora_unet_{}", layout.ldm_path(&target.path).unwrap()),
            TextEncoder => format!("lora_te_{}", target.path),
        }
        .replace('.', "_");
        tensors.push((format!("{path}.lora_down.weight"), m.down.shape.clone(), m.down.data.clone()));
        tensors.push((format!("{path}.lora_up.weight"), m.up.shape.clone(), m.up.data.clone()));
        tensors.push((format!("{path}.alpha"), vec![], vec![m.alpha.unwrap()]));
    }
    assert!(tensors.iter().any(|(k, _, _)| k.starts_with("lora_unet_input_blocks_4_1_transformer")));
    let lora = parse_tensors(&tensors, None).unwrap();
    assert_eq!(lora.modules, kohya.modules);
}

fn kohya_module(name: &str, down: &[usize], up: &[usize]) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    vec![
        (format!("{name}.lora_down.weight"), down.to_vec(), values(down.iter().product(), 7)),
        (format!("{name}.lora_up.weight"), up.to_vec(), values(up.iter().product(), 8)),
        (format!("{name}.alpha"), vec![], vec![1.0]),
    ]
}

#[test]
fn another_architecture_is_refused_listing_every_unmatched_key() {
    let sdxl = [
        kohya_module(KOHYA_TO_K, &[4, 32], &[64, 4]),
        kohya_module("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", &[4, 768], &[768, 4]),
        kohya_module("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", &[4, 1280], &[1280, 4]),
        kohya_module("lora_unet_input_blocks_4_1_transformer_blocks_5_attn2_to_k", &[4, 2048], &[640, 4]),
    ]
    .concat();
    let e = parse_tensors(&sdxl, None).unwrap_err();
    let LoraError::Unmatched { file, keys } = &e else { panic!("{e}") };
    assert_eq!(file, "test.safetensors");
    let mut expected: Vec<String> = sdxl[3..].iter().map(|(k, _, _)| k.clone()).collect();
    expected.sort();
    assert_eq!(keys, &expected);
    assert!(e.to_string().starts_with("test.safetensors: 9 keys match no module of this model"), "{e}");

    // An SDXL layer whose LDM name exists in SD 1.x: refused by its shape.
    let e = parse_tensors(&kohya_module("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", &[4, 2048], &[640, 4]), None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "test.safetensors: wrong shapes: \
         lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight is [4, 2048], expected [r, 32], \
         lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight is [640, 4], expected [64, r]"
    );
}

#[test]
fn wrong_shapes_are_all_listed() {
    let te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj";
    let mut tensors = [kohya_module(KOHYA_TO_K, &[4, 32], &[64, 3]), kohya_module(te, &[4, 31], &[32, 4])].concat();
    tensors[2] = (tensors[2].0.clone(), vec![2], vec![1.0, 1.0]);
    let e = parse_tensors(&tensors, None).unwrap_err();
    let LoraError::Shape { mismatches, .. } = &e else { panic!("{e}") };
    let found: Vec<(&str, &str, &[usize])> = mismatches.iter().map(|m| (m.key.as_str(), m.expected.as_str(), m.found.as_slice())).collect();
    let (up, alpha, down) = (format!("{KOHYA_TO_K}.lora_up.weight"), format!("{KOHYA_TO_K}.alpha"), format!("{te}.lora_down.weight"));
    assert_eq!(found, [(up.as_str(), "[64, 4]", [64, 3].as_slice()), (alpha.as_str(), "[] (one value)", [2].as_slice()), (down.as_str(), "[r, 32]", [4, 31].as_slice()),]);
}

#[test]
fn non_finite_values_are_refused_by_name() {
    for (at, value) in [(1, f32::NAN), (2, f32::INFINITY), (0, f32::NEG_INFINITY)] {
        let mut tensors = kohya_module(KOHYA_TO_K, &[4, 32], &[64, 4]);
        tensors[at].2[0] = value;
        let e = parse_tensors(&tensors, None).unwrap_err();
        assert_eq!(e.to_string(), format!("test.safetensors: tensor {} holds NaN or infinite values", tensors[at].0));
    }
}

#[test]
fn incomplete_conflicting_and_empty_files() {
    let module = kohya_module(KOHYA_TO_K, &[4, 32], &[64, 4]);
    let e = parse_tensors(&module[..1], None).unwrap_err();
    assert_eq!(e.to_string(), format!("test.safetensors: {KOHYA_TO_K}.lora_down.weight has no matching up weight"));
    let e = parse_tensors(&module[2..], None).unwrap_err();
    assert!(matches!(e, LoraError::Incomplete { .. }), "{e}");

    let mut both = module.clone();
    both.push((format!("unet.{TO_K}.lora_A.weight"), vec![4, 32], values(128, 9)));
    let e = parse_tensors(&both, None).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "test.safetensors: {KOHYA_TO_K}.lora_down.weight and unet.{TO_K}.lora_A.weight \
             all give the same tensor of unet.{TO_K}"
        )
    );

    let e = parse_tensors(&[], Some(r#"{"ss_network_dim": "4"}"#)).unwrap_err();
    assert_eq!(e.to_string(), "test.safetensors: no LoRA tensors");

    // A LoRA tensor of a dtype we cannot read is named, not skipped.
    let spec = [(format!("{KOHYA_TO_K}.lora_down.weight"), "I32", vec![4usize, 32], vec![0u8; 512])];
    let mut tensors: Vec<_> = spec.iter().map(|(k, d, s, b)| (k.as_str(), *d, s.as_slice(), b.clone())).collect();
    tensors.push((module[1].0.as_str(), "F32", &[64, 4], f32_bytes(&module[1].2)));
    let file = WeightFile::from_bytes("i.safetensors", safetensors_file(&tensors, None)).unwrap();
    let e = parse_lora(&file, &model()).unwrap_err();
    assert!(matches!(e, LoraError::Weights(crate::WeightError::UnsupportedDType { .. })), "{e}");
}

/// A second LoRA (rank 2, alpha 1) on some of the fixture's modules and on modules it leaves
/// alone, including a 1x1 convolution and the text encoder.
fn second_lora() -> LoraFile {
    let targets = [
        (attn(TO_K), vec![2, 32], vec![64, 2]),
        (attn("up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0"), vec![2, 64], vec![64, 2]),
        (attn("down_blocks.1.attentions.0.proj_in"), vec![2, 64, 1, 1], vec![64, 2, 1, 1]),
        (attn("down_blocks.0.resnets.1.conv2"), vec![2, 32, 3, 3], vec![32, 2, 1, 1]),
        (LoraTarget::new(TextEncoder, "text_model.encoder.layers.4.mlp.fc1"), vec![2, 32], vec![37, 2]),
    ];
    let modules = targets
        .into_iter()
        .enumerate()
        .map(|(i, (target, down, up))| {
            let tensor = |shape: Vec<usize>, seed| Tensor32 { data: values(shape.iter().product(), seed), shape };
            let module = LoraModule { down: tensor(down, 10 + i as u64), up: tensor(up, 20 + i as u64), alpha: Some(1.0) };
            (target, module)
        })
        .collect();
    LoraFile { format: LoraFormat::Peft, modules, metadata: kohya_metadata(2, 1.0), dtype: DType::F32 }
}

#[test]
fn stacking_adds_the_deltas_exactly() {
    let mut a = fixture("kohya");
    // A scale other than 1 on one side, to see it folded.
    a.modules.get_mut(&attn(TO_K)).unwrap().alpha = Some(2.0);
    let b = second_lora();
    let stacked = stack(&a, &b).unwrap();
    assert_eq!((stacked.format, &stacked.metadata, stacked.dtype), (a.format, &a.metadata, a.dtype));
    assert_eq!(stacked.modules.len(), a.modules.len() + 3);
    for (target, m) in &stacked.modules {
        match (a.modules.get(target), b.modules.get(target)) {
            (Some(ma), Some(mb)) => {
                assert_eq!((m.rank(), m.alpha), (6, Some(6.0)), "{target}");
                let sum: Vec<f32> = delta(ma).iter().zip(delta(mb)).map(|(x, y)| x + y).collect();
                assert_close(&delta(m), &sum, &target.to_string());
            }
            (Some(only), None) | (None, Some(only)) => assert_eq!(m, only, "{target}"),
            (None, None) => unreachable!(),
        }
    }
    assert_eq!(stacked.modules.values().filter(|m| m.rank() == 6).count(), 2);
    // The sealed LoRA goes back out in the user's layout and reads back the same.
    assert_same_deltas(&stacked, &reparse(write_in_format(&stacked).unwrap()));
    let mut peft = stacked.clone();
    peft.format = LoraFormat::Peft;
    let again = reparse(write_in_format(&peft).unwrap());
    assert_eq!(again.format, LoraFormat::Peft);
    assert_same_deltas(&stacked, &again);
}

#[test]
fn stack_refuses_modules_that_differ_beyond_rank() {
    let a = fixture("kohya");
    let mut b = second_lora();
    let m = b.modules.get_mut(&attn(TO_K)).unwrap();
    m.down = Tensor32 { shape: vec![2, 31], data: values(62, 1) };
    let e = stack(&a, &b).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "LoRA module unet.{TO_K}: cannot stack down [4, 32] / up [64, 4] with down [2, 31] / \
             up [64, 2]: only the rank may differ"
        )
    );
}

#[test]
fn writers_refuse_inconsistent_modules() {
    let mut lora = second_lora();
    lora.modules.get_mut(&attn(TO_K)).unwrap().up.shape = vec![64, 3];
    let e = write_kohya(&lora).unwrap_err();
    assert!(e.to_string().starts_with(&format!("LoRA module unet.{TO_K}: down [2, 32] and up [64, 3]")), "{e}");

    let mut lora = second_lora();
    lora.modules.get_mut(&attn(TO_K)).unwrap().down.data.pop();
    let e = write_peft(&lora).unwrap_err();
    assert_eq!(e.to_string(), format!("LoRA module unet.{TO_K}: down has 63 values for shape [2, 32]"));

    let mut lora = second_lora();
    lora.dtype = DType::F16;
    lora.modules.get_mut(&attn(TO_K)).unwrap().up.data[0] = 1e6;
    let e = write_diffusers_legacy(&lora).unwrap_err();
    assert_eq!(e.to_string(), format!("LoRA module unet.{TO_K}: unet.{TO_K}.lora.up.weight has values that are not finite in F16"));
    lora.modules.get_mut(&attn(TO_K)).unwrap().alpha = Some(f32::NAN);
    assert!(write_kohya(&lora).unwrap_err().to_string().ends_with("alpha NaN is not finite"));
}

#[test]
fn rank_and_scale() {
    let m = &second_lora().modules[&attn(TO_K)];
    assert_eq!((m.rank(), m.scale()), (2, 0.5));
    let none = LoraModule { alpha: None, ..m.clone() };
    assert_eq!(none.scale(), 1.0);
    assert_eq!(attn(TO_K).to_string(), format!("unet.{TO_K}"));
}
