//! The single-file fixture must split into exactly the diffusers folder diffusers made from it:
//! same names, shapes and bit-identical f32 data for every tensor of all three components.

use std::path::Path;
use std::rc::Rc;

use seal_weights::{Component, DType, WeightFile, split_single_file};

use seal_weights::test_fixtures as fixtures;

fn open(path: &Path) -> Rc<WeightFile> {
    Rc::new(WeightFile::open(path).unwrap())
}

const FOLDER_FILES: [&str; 3] =
    ["tiny-pixel/unet/diffusion_pytorch_model.safetensors", "tiny-pixel/text_encoder/model.safetensors", "tiny-pixel/vae/diffusion_pytorch_model.safetensors"];

fn assert_identical(split: &Component, folder_file: &str) {
    let folder = Component::from_file(open(&fixtures().join(folder_file)));
    assert_eq!(split.keys().collect::<Vec<_>>(), folder.keys().collect::<Vec<_>>(), "{folder_file}");
    for key in folder.keys() {
        assert_eq!(split.shape(key), folder.shape(key), "{key}");
        assert_eq!(split.dtype(key), Some(DType::F32), "{key}");
        let (a, b) = (split.load_f32(key).unwrap(), folder.load_f32(key).unwrap());
        assert_eq!(a.shape, b.shape, "{key}");
        assert!(a.data.iter().map(|v| v.to_bits()).eq(b.data.iter().map(|v| v.to_bits())), "{key}");
    }
}

#[test]
fn single_file_reproduces_the_diffusers_folder_bit_exactly() {
    let single = split_single_file(open(&fixtures().join("tiny-pixel.safetensors"))).unwrap();
    assert_eq!(single.layers_per_block, 2);
    assert!(single.unused.is_empty(), "{:?}", single.unused);
    assert_eq!(single.unet.keys().count(), 304);
    assert_eq!(single.text_encoder.keys().count(), 84);
    assert_eq!(single.vae.keys().count(), 124);
    for (component, folder_file) in [&single.unet, &single.text_encoder, &single.vae].into_iter().zip(FOLDER_FILES) {
        assert_identical(component, folder_file);
    }
}

/// Rewrites the fixture's header the way older checkpoints look: text-encoder keys without
/// `text_model.`, an int64 `position_ids` buffer, plus one key nobody knows.
fn old_style_checkpoint() -> Vec<u8> {
    let bytes = std::fs::read(fixtures().join("tiny-pixel.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    let mut renamed: serde_json::Map<String, serde_json::Value> =
        header.into_iter().map(|(k, v)| (k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."), v)).collect();
    for (key, dtype, len) in [("cond_stage_model.transformer.embeddings.position_ids", "I64", 77), ("ema_scale", "F32", 1)] {
        let start = data.len();
        data.resize(start + len * 8 / if dtype == "F32" { 2 } else { 1 }, 0);
        let entry = serde_json::json!({"dtype": dtype, "shape": [1, len], "data_offsets": [start, data.len()]});
        renamed.insert(key.into(), entry);
    }
    let header = serde_json::to_vec(&renamed).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    out.extend(data);
    out
}

#[test]
fn old_text_encoder_keys_split_the_same() {
    let file = Rc::new(WeightFile::from_bytes("old.safetensors", old_style_checkpoint()).unwrap());
    let single = split_single_file(file).unwrap();
    assert_eq!(single.unused, ["ema_scale"]);
    assert_identical(&single.text_encoder, FOLDER_FILES[1]);
}

#[test]
fn damaged_copies_of_the_fixture_fail_cleanly() {
    let bytes = std::fs::read(fixtures().join("tiny-pixel.safetensors")).unwrap();
    for cut in [0, 7, 8, 100, bytes.len() / 2, bytes.len() - 1] {
        let e = WeightFile::from_bytes("cut.safetensors", bytes[..cut].to_vec()).unwrap_err().to_string();
        assert!(e.starts_with("cut.safetensors: "), "{cut}: {e}");
    }
}
