//! [`LoraFile`] -> safetensors bytes in each layout, for the tools users load them into.
//!
//! Kohya files carry their alphas as tensors, which A1111, ComfyUI and diffusers all read. The
//! diffusers layouts have no alpha tensor that diffusers reads (it takes alphas only from its
//! `lora_adapter_metadata` config, and ComfyUI only from `.alpha` tensors), so there each
//! module's scale is folded into `up` and the config states alpha = rank: every loader then
//! applies the same delta.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::parse::ADAPTER_METADATA;
use super::{LoraComponent, LoraError, LoraFile, LoraFormat, LoraModule, LoraTarget};
use crate::DType;

/// The kohya metadata loaders and model sites read; the caller adds base model and `seal_*`
/// records.
pub fn kohya_metadata(rank: usize, alpha: f32) -> BTreeMap<String, String> {
    [("ss_network_module", "networks.lora".to_owned()), ("ss_network_dim", rank.to_string()), ("ss_network_alpha", alpha.to_string())]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

/// Writes `lora` in its own [`LoraFormat`].
pub fn write_in_format(lora: &LoraFile) -> Result<Vec<u8>, LoraError> {
    match lora.format {
        LoraFormat::Kohya => write_kohya(lora),
        LoraFormat::Peft => write_peft(lora),
        LoraFormat::DiffusersLegacy => write_diffusers_legacy(lora),
    }
}

/// Kohya / A1111 layout in `lora.dtype`: `lora_unet_<path with _>.lora_down.weight`,
/// `.lora_up.weight` and `.alpha` (the rank where the module has none, which is the same scale).
/// Writes `lora.metadata` except `lora_adapter_metadata`, which diffusers would apply instead
/// of the alpha tensors.
pub fn write_kohya(lora: &LoraFile) -> Result<Vec<u8>, LoraError> {
    let mut tensors = Tensors::new(lora.dtype);
    for (target, module) in &lora.modules {
        check(target, module)?;
        let prefix = match target.component {
            LoraComponent::Unet => "lora_unet_",
            LoraComponent::TextEncoder => "lora_te_",
        };
        let name = format!("{prefix}{}", target.path.replace('.', "_"));
        let alpha = module.alpha.unwrap_or(module.rank() as f32);
        tensors.add(target, format!("{name}.lora_down.weight"), &module.down.shape, &module.down.data)?;
        tensors.add(target, format!("{name}.lora_up.weight"), &module.up.shape, &module.up.data)?;
        tensors.add(target, format!("{name}.alpha"), &[], &[alpha])?;
    }
    let mut metadata = lora.metadata.clone();
    metadata.remove(ADAPTER_METADATA);
    Ok(tensors.serialize(&metadata))
}

/// peft layout in `lora.dtype`, as diffusers' `save_lora_weights` writes it:
/// `unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`.
pub fn write_peft(lora: &LoraFile) -> Result<Vec<u8>, LoraError> {
    write_diffusers(lora, |_, path| (format!("{path}.lora_A.weight"), format!("{path}.lora_B.weight")))
}

/// The older diffusers layout in `lora.dtype`, as the diffusers-made files have it:
/// `unet.<path>.lora.down.weight`, `text_encoder.<path>.lora_linear_layer.down.weight`.
pub fn write_diffusers_legacy(lora: &LoraFile) -> Result<Vec<u8>, LoraError> {
    write_diffusers(lora, |component, path| {
        let infix = match component {
            LoraComponent::Unet => "lora",
            LoraComponent::TextEncoder => "lora_linear_layer",
        };
        (format!("{path}.{infix}.down.weight"), format!("{path}.{infix}.up.weight"))
    })
}

/// Both diffusers layouts: scales folded into `up`, `lora.metadata` plus `format` and a
/// `lora_adapter_metadata` config per component stating each module's rank as its alpha.
fn write_diffusers(lora: &LoraFile, names: impl Fn(LoraComponent, &str) -> (String, String)) -> Result<Vec<u8>, LoraError> {
    let mut tensors = Tensors::new(lora.dtype);
    let mut ranks: BTreeMap<LoraComponent, BTreeMap<&str, usize>> = BTreeMap::new();
    for (target, module) in &lora.modules {
        check(target, module)?;
        let (down, up) = names(target.component, &target.path);
        let prefix = target.component.name();
        let scale = module.scale();
        let up_data: Vec<f32> = module.up.data.iter().map(|v| v * scale).collect();
        tensors.add(target, format!("{prefix}.{down}"), &module.down.shape, &module.down.data)?;
        tensors.add(target, format!("{prefix}.{up}"), &module.up.shape, &up_data)?;
        ranks.entry(target.component).or_default().insert(&target.path, module.rank());
    }
    let mut config = Map::new();
    for (component, ranks) in ranks {
        for (field, value) in peft_config(&ranks) {
            config.insert(format!("{}.{field}", component.name()), value);
        }
    }
    let mut metadata = lora.metadata.clone();
    metadata.insert("format".into(), "pt".into());
    metadata.insert(ADAPTER_METADATA.into(), Value::Object(config).to_string());
    Ok(tensors.serialize(&metadata))
}

/// A peft `LoraConfig` (the fields that matter) for modules whose alpha equals their rank:
/// the most common rank as `r` and `lora_alpha`, the others in both patterns by full path.
fn peft_config(ranks: &BTreeMap<&str, usize>) -> Map<String, Value> {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for &r in ranks.values() {
        *counts.entry(r).or_default() += 1;
    }
    // Most common, the smallest on a tie (any choice is exact; this one is deterministic).
    let r = counts.iter().max_by_key(|&(&rank, &n)| (n, std::cmp::Reverse(rank))).map_or(0, |(&rank, _)| rank);
    let pattern: Map<String, Value> = ranks.iter().filter(|&(_, &rank)| rank != r).map(|(&path, &rank)| (path.to_owned(), json!(rank))).collect();
    let targets: BTreeSet<&str> = ranks.keys().copied().collect();
    [("r", json!(r)), ("lora_alpha", json!(r)), ("rank_pattern", Value::Object(pattern.clone())), ("alpha_pattern", Value::Object(pattern)), ("target_modules", json!(targets))]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
}

fn check(target: &LoraTarget, module: &LoraModule) -> Result<(), LoraError> {
    module.check().map_err(|reason| LoraError::Module { target: target.to_string(), reason })
}

/// Tensors encoded in one dtype, by key.
struct Tensors {
    dtype: DType,
    tensors: BTreeMap<String, (Vec<usize>, Vec<u8>)>,
}

impl Tensors {
    fn new(dtype: DType) -> Self {
        Self { dtype, tensors: BTreeMap::new() }
    }

    /// Refuses values that are not finite in the dtype (an f16 overflow becomes infinite).
    fn add(&mut self, target: &LoraTarget, key: String, shape: &[usize], data: &[f32]) -> Result<(), LoraError> {
        let bytes =
            self.dtype.encode(data).ok_or_else(|| LoraError::Module { target: target.to_string(), reason: format!("{key} has values that are not finite in {}", self.dtype) })?;
        self.tensors.insert(key, (shape.to_vec(), bytes));
        Ok(())
    }

    /// The safetensors layout: header length, JSON header padded with spaces to 8 bytes (as
    /// the reference writer does, so the data is aligned), data in key order.
    fn serialize(self, metadata: &BTreeMap<String, String>) -> Vec<u8> {
        let entries: Vec<(&str, &[usize])> = self.tensors.iter().map(|(k, (shape, _))| (k.as_str(), shape.as_slice())).collect();
        let mut out = crate::safetensors_head(self.dtype, &entries, metadata);
        for (_, bytes) in self.tensors.values() {
            out.extend_from_slice(bytes);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_each_dtype_and_refuses_overflow() {
        assert_eq!(DType::F32.encode(&[1.5]), Some(1.5f32.to_le_bytes().to_vec()));
        assert_eq!(DType::F16.encode(&[1.0, -2.0]), Some(vec![0x00, 0x3c, 0x00, 0xc0]));
        assert_eq!(DType::BF16.encode(&[1.0]), Some(vec![0x80, 0x3f]));
        assert_eq!(DType::F16.encode(&[70000.0]), None);
        assert_eq!(DType::BF16.encode(&[f32::MAX]), None);
        assert_eq!(DType::F32.encode(&[f32::NAN]), None);
        assert_eq!(DType::F16.encode(&[f32::NAN]), None);
    }

    #[test]
    fn kohya_metadata_defaults() {
        let m = kohya_metadata(8, 4.0);
        assert_eq!(m["ss_network_module"], "networks.lora");
        assert_eq!(m["ss_network_dim"], "8");
        assert_eq!(m["ss_network_alpha"], "4");
        assert_eq!(kohya_metadata(4, 0.5)["ss_network_alpha"], "0.5");
    }

    #[test]
    fn peft_config_puts_uncommon_ranks_in_patterns() {
        let ranks = [("a", 4), ("b", 8), ("c", 4), ("d", 2)].into_iter().collect();
        let c = Value::Object(peft_config(&ranks));
        assert_eq!(
            c,
            json!({
                "r": 4, "lora_alpha": 4,
                "rank_pattern": {"b": 8, "d": 2}, "alpha_pattern": {"b": 8, "d": 2},
                "target_modules": ["a", "b", "c", "d"],
            })
        );
    }
}
