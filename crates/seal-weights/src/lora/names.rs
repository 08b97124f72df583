//! Tensor keys of the three layouts -> (target module, which tensor), against the model's paths.

use std::collections::BTreeMap;

use super::ldm::UnetLayout;
use super::{LoraComponent, LoraTarget, ModelPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    Down,
    Up,
    Alpha,
}

/// The naming a key uses. Alpha keys in diffusers naming (`unet.<path>.alpha`, as diffusers
/// names its `network_alphas`) fit both diffusers layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Naming {
    Kohya,
    Peft,
    Legacy,
    DiffusersAlpha,
}

const KOHYA_PREFIXES: [(&str, LoraComponent); 2] = [("lora_unet_", LoraComponent::Unet), ("lora_te_", LoraComponent::TextEncoder)];

const KOHYA_SUFFIXES: [(&str, Role); 3] = [(".lora_down.weight", Role::Down), (".lora_up.weight", Role::Up), (".alpha", Role::Alpha)];

/// (suffix, role, naming, only after an attention-processor name like `to_k_lora`), in match
/// order: the bare `.down.weight` comes last.
const DIFFUSERS_SUFFIXES: [(&str, Role, Naming, bool); 9] = [
    (".lora_A.weight", Role::Down, Naming::Peft, false),
    (".lora_B.weight", Role::Up, Naming::Peft, false),
    (".lora.down.weight", Role::Down, Naming::Legacy, false),
    (".lora.up.weight", Role::Up, Naming::Legacy, false),
    (".lora_linear_layer.down.weight", Role::Down, Naming::Legacy, false),
    (".lora_linear_layer.up.weight", Role::Up, Naming::Legacy, false),
    (".down.weight", Role::Down, Naming::Legacy, true),
    (".up.weight", Role::Up, Naming::Legacy, true),
    (".alpha", Role::Alpha, Naming::DiffusersAlpha, false),
];

pub(super) struct NameIndex<'a> {
    model: &'a ModelPaths,
    /// Every path with `.` flattened to `_` (UNet paths also under their LDM name) -> the path;
    /// None where two paths flatten alike, so neither is guessed.
    flat: BTreeMap<(LoraComponent, String), Option<&'a str>>,
}

impl<'a> NameIndex<'a> {
    pub(super) fn new(model: &'a ModelPaths) -> Self {
        let mut flat = BTreeMap::new();
        let mut add = |component, name: String, path: &'a str| {
            flat.entry((component, name.replace('.', "_")))
                .and_modify(|p: &mut Option<&str>| {
                    if *p != Some(path) {
                        *p = None;
                    }
                })
                .or_insert(Some(path));
        };
        for component in LoraComponent::ALL {
            for path in model.get(component).keys() {
                add(component, path.clone(), path);
            }
        }
        if let Some(layout) = UnetLayout::of(&model.unet) {
            for path in model.unet.keys() {
                if let Some(ldm) = layout.ldm_path(path) {
                    add(LoraComponent::Unet, ldm, path);
                }
            }
        }
        Self { model, flat }
    }

    /// The module and tensor a key gives, or None for a key this model has no place for.
    pub(super) fn resolve(&self, key: &str) -> Option<(LoraTarget, Role, Naming)> {
        if let Some((rest, component)) = KOHYA_PREFIXES.iter().find_map(|(prefix, c)| Some((key.strip_prefix(prefix)?, *c))) {
            let (name, role) = KOHYA_SUFFIXES.iter().find_map(|(suffix, role)| Some((rest.strip_suffix(suffix)?, *role)))?;
            let path = (*self.flat.get(&(component, name.to_owned()))?)?;
            return Some((LoraTarget::new(component, path), role, Naming::Kohya));
        }
        // Old attention-processor files (`unet.save_attn_procs`) have no component prefix.
        let (component, rest) = match key.split_once('.') {
            Some(("unet", rest)) => (LoraComponent::Unet, rest),
            Some(("text_encoder", rest)) => (LoraComponent::TextEncoder, rest),
            _ => (LoraComponent::Unet, key),
        };
        let (name, role, naming, processor_only) = DIFFUSERS_SUFFIXES.iter().find_map(|(suffix, r, n, p)| Some((rest.strip_suffix(suffix)?, *r, *n, *p)))?;
        let path = match processor_path(component, name) {
            Some(path) => path,
            None if !processor_only => name.to_owned(),
            None => return None,
        };
        self.model.get(component).contains_key(&path).then(|| (LoraTarget::new(component, path), role, naming))
    }
}

/// An attention-processor LoRA name -> the layer it adapts, as diffusers converts them:
/// `attn1.processor.to_out_lora` -> `attn1.to_out.0`, and in the text encoder
/// `self_attn.to_q_lora` -> `self_attn.q_proj`. None for other names.
fn processor_path(component: LoraComponent, name: &str) -> Option<String> {
    let (parent, last) = name.rsplit_once('.')?;
    let projection = last.strip_suffix("_lora")?;
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let layer = match (component, projection) {
        (LoraComponent::Unet, "to_out") => "to_out.0",
        (LoraComponent::TextEncoder, "to_q") => "q_proj",
        (LoraComponent::TextEncoder, "to_k") => "k_proj",
        (LoraComponent::TextEncoder, "to_v") => "v_proj",
        (LoraComponent::TextEncoder, "to_out") => "out_proj",
        (_, other) => other,
    };
    Some(format!("{parent}.{layer}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use LoraComponent::{TextEncoder, Unet};

    const ATTN: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn2";
    const TE: &str = "text_model.encoder.layers.0.self_attn";

    fn model() -> ModelPaths {
        let unet = [
            format!("{ATTN}.to_k"),
            format!("{ATTN}.to_out.0"),
            "down_blocks.0.resnets.0.conv1".into(),
            "down_blocks.0.resnets.1.conv1".into(),
            "up_blocks.0.resnets.0.conv1".into(),
            // Flattens like the next one: neither may be guessed.
            "a.b_c".into(),
            "a_b.c".into(),
        ];
        let te = [format!("{TE}.q_proj"), format!("{TE}.out_proj")];
        let shapes = |paths: &[String]| paths.iter().map(|p| (p.clone(), vec![4, 4])).collect();
        ModelPaths { unet: shapes(&unet), text_encoder: shapes(&te) }
    }

    fn resolve(key: &str) -> Option<(LoraComponent, String, Role, Naming)> {
        let model = model();
        let (t, role, naming) = NameIndex::new(&model).resolve(key)?;
        Some((t.component, t.path, role, naming))
    }

    #[test]
    fn kohya_names_resolve_by_flattened_path() {
        let flat = ATTN.replace('.', "_");
        assert_eq!(resolve(&format!("lora_unet_{flat}_to_out_0.lora_up.weight")), Some((Unet, format!("{ATTN}.to_out.0"), Role::Up, Naming::Kohya)));
        assert_eq!(resolve("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha"), Some((TextEncoder, format!("{TE}.q_proj"), Role::Alpha, Naming::Kohya)));
        // LDM names: input_blocks.1.0 is down_blocks.0.resnets.0 (two layers per block).
        assert_eq!(resolve("lora_unet_input_blocks_2_0_in_layers_2.lora_down.weight"), Some((Unet, "down_blocks.0.resnets.1.conv1".into(), Role::Down, Naming::Kohya)));
        assert_eq!(resolve("lora_unet_output_blocks_0_0_in_layers_2.lora_down.weight").unwrap().1, "up_blocks.0.resnets.0.conv1");
        for key in [
            "lora_unet_a_b_c.lora_down.weight",
            &format!("lora_unet_{flat}_to_v.lora_down.weight"),
            &format!("lora_unet_{flat}_to_k.lora_mid.weight"),
            &format!("lora_unet_{flat}_to_k.hada_w1_a"),
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_A.weight",
        ] {
            assert_eq!(resolve(key), None, "{key}");
        }
    }

    #[test]
    fn peft_and_legacy_names() {
        let cases = [
            (format!("unet.{ATTN}.to_k.lora_A.weight"), Role::Down, Naming::Peft),
            (format!("unet.{ATTN}.to_k.lora_B.weight"), Role::Up, Naming::Peft),
            (format!("unet.{ATTN}.to_k.lora.down.weight"), Role::Down, Naming::Legacy),
            (format!("unet.{ATTN}.to_k.lora_linear_layer.up.weight"), Role::Up, Naming::Legacy),
            (format!("unet.{ATTN}.processor.to_k_lora.down.weight"), Role::Down, Naming::Legacy),
            (format!("{ATTN}.processor.to_k_lora.up.weight"), Role::Up, Naming::Legacy),
            (format!("unet.{ATTN}.to_k.alpha"), Role::Alpha, Naming::DiffusersAlpha),
        ];
        for (key, role, naming) in cases {
            assert_eq!(resolve(&key), Some((Unet, format!("{ATTN}.to_k"), role, naming)), "{key}");
        }
        assert_eq!(resolve(&format!("unet.{ATTN}.processor.to_out_lora.up.weight")).unwrap().1, format!("{ATTN}.to_out.0"));
        assert_eq!(resolve(&format!("text_encoder.{TE}.to_out_lora.down.weight")).unwrap().1, format!("{TE}.out_proj"));
        assert_eq!(resolve(&format!("text_encoder.{TE}.q_proj.lora_linear_layer.down.weight")), Some((TextEncoder, format!("{TE}.q_proj"), Role::Down, Naming::Legacy)));
        for key in [
            format!("unet.{ATTN}.to_k.down.weight"),
            format!("unet.{ATTN}.to_k.lora_A.bias"),
            format!("unet.{ATTN}.to_k.lora_magnitude_vector"),
            format!("text_encoder.{ATTN}.to_k.lora_A.weight"),
            format!("vae.{ATTN}.to_k.lora_A.weight"),
        ] {
            assert_eq!(resolve(&key), None, "{key}");
        }
    }
}
