//! A LoRA file -> [`LoraFile`], checked whole (names, shapes, values) before anything returns.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::names::{NameIndex, Naming, Role};
use super::{LoraComponent, LoraError, LoraFile, LoraFormat, LoraModule, LoraTarget, ModelPaths, ShapeMismatch};
use crate::{DType, Tensor32, TensorInfo, WeightError, WeightFile};

/// The key diffusers stores its peft `LoraConfig`s under, as JSON with `unet.`/`text_encoder.`
/// prefixed fields (`unet.lora_alpha`, `unet.alpha_pattern`, ...).
pub(super) const ADAPTER_METADATA: &str = "lora_adapter_metadata";

/// peft's `LoraConfig.lora_alpha` default, which applies when a config omits it.
const PEFT_DEFAULT_ALPHA: f64 = 8.0;

/// The keys of one target module.
#[derive(Default)]
struct Keys {
    down: Option<String>,
    up: Option<String>,
    alpha: Option<String>,
}

/// Reads every LoRA tensor of `file` onto `model`'s modules. Refuses the file if any key has
/// no place in the model ([`LoraError::Unmatched`], listing them all), a module lacks its down
/// or up weight, a shape does not fit ([`LoraError::Shape`], listing them all), or a value is
/// NaN or infinite.
///
/// Alphas: kohya `.alpha` tensors; in diffusers-style files `<prefix>.<path>.alpha` tensors, else
/// the peft config in the `lora_adapter_metadata` metadata (what diffusers applies), else none
/// (scale 1, as every loader does).
pub fn parse_lora(file: &WeightFile, model: &ModelPaths) -> Result<LoraFile, LoraError> {
    let name = file.name().to_owned();
    let index = NameIndex::new(model);
    let mut targets: BTreeMap<LoraTarget, Keys> = BTreeMap::new();
    let (mut unmatched, mut conflict) = (Vec::new(), None);
    let (mut kohya, mut legacy) = (false, false);
    for key in file.keys().chain(file.unsupported_tensors().map(|(k, _)| k)) {
        let Some((target, role, naming)) = index.resolve(key) else {
            unmatched.push(key.to_owned());
            continue;
        };
        kohya |= naming == Naming::Kohya;
        legacy |= naming == Naming::Legacy;
        let keys = targets.entry(target.clone()).or_default();
        let slot = match role {
            Role::Down => &mut keys.down,
            Role::Up => &mut keys.up,
            Role::Alpha => &mut keys.alpha,
        };
        if let Some(other) = slot.replace(key.to_owned()) {
            conflict.get_or_insert(LoraError::Conflict { file: name.clone(), target: target.to_string(), keys: vec![other, key.to_owned()] });
        }
    }
    if !unmatched.is_empty() {
        unmatched.sort();
        return Err(LoraError::Unmatched { file: name, keys: unmatched });
    }
    if let Some(e) = conflict {
        return Err(e);
    }
    if targets.is_empty() {
        return Err(LoraError::Empty { file: name });
    }

    let mut complete = Vec::with_capacity(targets.len());
    for (target, keys) in targets {
        let incomplete = |key: String, missing: &str| LoraError::Incomplete { file: name.clone(), key, missing: missing.to_owned() };
        match (keys.down, keys.up, keys.alpha) {
            (Some(down), Some(up), alpha) => complete.push((target, down, up, alpha)),
            (Some(down), None, _) => return Err(incomplete(down, "up weight")),
            (None, Some(up), _) => return Err(incomplete(up, "down weight")),
            (None, None, alpha) => {
                return Err(incomplete(alpha.unwrap_or_default(), "down and up weights"));
            }
        }
    }

    // Shapes first, from the header alone, so every misfit is reported at once.
    let mut mismatches = Vec::new();
    let mut dtypes = Vec::new();
    for (target, down, up, alpha) in &complete {
        let weight = &model.get(target.component)[&target.path];
        let (d, u) = (info(file, down)?, info(file, up)?);
        dtypes.extend([d.dtype, u.dtype]);
        mismatches.extend(check_shapes(target, weight, (down, &d.shape), (up, &u.shape)));
        if let Some(alpha) = alpha {
            let shape = &info(file, alpha)?.shape;
            if shape.iter().product::<usize>() != 1 {
                mismatches.push(ShapeMismatch { key: alpha.clone(), expected: "[] (one value)".into(), found: shape.clone() });
            }
        }
    }
    if !mismatches.is_empty() {
        return Err(LoraError::Shape { file: name, mismatches });
    }

    // A kohya file's alphas are its tensors: diffusers refuses a config beside them.
    let configs = if kohya { BTreeMap::new() } else { peft_configs(file)? };
    let mut modules = BTreeMap::new();
    for (target, down, up, alpha) in complete {
        let weight = &model.get(target.component)[&target.path];
        let (mut down, mut up) = (load(file, &down)?, load(file, &up)?);
        let rank = down.shape[0];
        let alpha = match alpha {
            Some(key) => Some(load(file, &key)?.data[0]),
            None => configs.get(&target.component).map(|c| c.alpha(&target.path, rank)),
        };
        // The target's own layout (same data): a 1x1 convolution may carry a linear LoRA.
        let conv = weight.len() == 4;
        down.shape = if conv { vec![rank, weight[1], weight[2], weight[3]] } else { vec![rank, weight[1]] };
        up.shape = if conv { vec![weight[0], rank, 1, 1] } else { vec![weight[0], rank] };
        modules.insert(target, LoraModule { down, up, alpha });
    }
    let format = if kohya {
        LoraFormat::Kohya
    } else if legacy {
        LoraFormat::DiffusersLegacy
    } else {
        LoraFormat::Peft
    };
    let dtype = match dtypes.split_first() {
        Some((first, rest)) if rest.iter().all(|d| d == first) => *first,
        _ => DType::F32,
    };
    Ok(LoraFile { format, modules, metadata: file.metadata().clone(), dtype })
}

/// A key's header entry; keys without one hold a dtype we cannot load.
fn info<'f>(file: &'f WeightFile, key: &str) -> Result<&'f TensorInfo, LoraError> {
    file.info(key).ok_or_else(|| {
        let dtype = file.unsupported_tensors().find(|&(k, _)| k == key).map(|(_, d)| d.to_owned()).unwrap_or_default();
        WeightError::UnsupportedDType { file: file.name().to_owned(), tensor: key.to_owned(), dtype }.into()
    })
}

fn load(file: &WeightFile, key: &str) -> Result<Tensor32, LoraError> {
    let t = file.load_f32(key)?;
    if t.data.iter().all(|v| v.is_finite()) { Ok(t) } else { Err(LoraError::NonFinite { file: file.name().to_owned(), tensor: key.to_owned() }) }
}

/// down `[r, in]` / `[r, in, kh, kw]` and up `[out, r]` / `[out, r, 1, 1]` against the target
/// weight `[out, in]` / `[out, in, kh, kw]`; a 1x1 kernel may be written either way.
fn check_shapes(target: &LoraTarget, weight: &[usize], (down_key, down): (&str, &[usize]), (up_key, up): (&str, &[usize])) -> Vec<ShapeMismatch> {
    let (out, inp, kernel) = match *weight {
        [out, inp] => (out, inp, [1, 1]),
        [out, inp, kh, kw] => (out, inp, [kh, kw]),
        _ => {
            return vec![ShapeMismatch {
                key: down_key.to_owned(),
                expected: format!("no LoRA: {target} has weight shape {weight:?}, not a Linear or Conv2d layer"),
                found: down.to_vec(),
            }];
        }
    };
    let rank = match *down {
        [r, i] if r > 0 && i == inp && kernel == [1, 1] => Some(r),
        [r, i, kh, kw] if r > 0 && i == inp && kernel == [kh, kw] => Some(r),
        _ => None,
    };
    let up_fits = match *up {
        [o, r] | [o, r, 1, 1] => o == out && r > 0 && rank.is_none_or(|rank| r == rank),
        _ => false,
    };
    let mut mismatches = Vec::new();
    if rank.is_none() {
        let expected = match (weight.len(), kernel) {
            (2, _) => format!("[r, {inp}]"),
            (_, [1, 1]) => format!("[r, {inp}, 1, 1] or [r, {inp}]"),
            (_, [kh, kw]) => format!("[r, {inp}, {kh}, {kw}]"),
        };
        mismatches.push(ShapeMismatch { key: down_key.to_owned(), expected, found: down.to_vec() });
    }
    if !up_fits {
        let r = rank.map_or("r".to_owned(), |r| r.to_string());
        let expected = if weight.len() == 4 { format!("[{out}, {r}, 1, 1]") } else { format!("[{out}, {r}]") };
        mismatches.push(ShapeMismatch { key: up_key.to_owned(), expected, found: up.to_vec() });
    }
    mismatches
}

/// The scale-setting fields of one component's peft `LoraConfig`.
#[derive(Debug, PartialEq)]
struct PeftConfig {
    lora_alpha: f32,
    /// (module pattern, alpha), in the order peft tries them.
    alpha_pattern: Vec<(String, f32)>,
    /// Scale alpha / sqrt(r) instead of alpha / r.
    use_rslora: bool,
}

impl PeftConfig {
    /// The alpha that gives peft's scale under our `alpha / rank` rule.
    fn alpha(&self, path: &str, rank: usize) -> f32 {
        // peft matches `(.*\.)?(pattern)$`; a leading `^` anchors the pattern at the start.
        let alpha = self
            .alpha_pattern
            .iter()
            .find(|(pattern, _)| match pattern.strip_prefix('^') {
                Some(anchored) => path == anchored,
                None => path == pattern || path.ends_with(&format!(".{pattern}")),
            })
            .map_or(self.lora_alpha, |(_, a)| *a);
        if self.use_rslora { alpha * (rank as f32).sqrt() } else { alpha }
    }
}

/// The per-component peft configs in `lora_adapter_metadata`, where there is one.
fn peft_configs(file: &WeightFile) -> Result<BTreeMap<LoraComponent, PeftConfig>, LoraError> {
    let Some(raw) = file.metadata().get(ADAPTER_METADATA) else {
        return Ok(BTreeMap::new());
    };
    let error = |reason: String| LoraError::Metadata { file: file.name().to_owned(), reason };
    let json: Map<String, Value> = serde_json::from_str(raw).map_err(|e| error(format!("not a JSON object: {e}")))?;
    let number = |key: &str, v: &Value| v.as_f64().map(|n| n as f32).ok_or_else(|| error(format!("{key} must be a number, found {v}")));
    let mut configs = BTreeMap::new();
    for component in LoraComponent::ALL {
        let prefix = format!("{}.", component.name());
        let fields: BTreeMap<&str, &Value> = json.iter().filter_map(|(k, v)| Some((k.strip_prefix(&prefix)?, v))).collect();
        if fields.is_empty() {
            continue;
        }
        let lora_alpha = match fields.get("lora_alpha") {
            Some(v) => number("lora_alpha", v)?,
            None => PEFT_DEFAULT_ALPHA as f32,
        };
        let alpha_pattern = match fields.get("alpha_pattern") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(map)) => map.iter().map(|(k, v)| Ok((k.clone(), number(k, v)?))).collect::<Result<_, LoraError>>()?,
            Some(v) => return Err(error(format!("alpha_pattern must be an object, found {v}"))),
        };
        let use_rslora = match fields.get("use_rslora") {
            None | Some(Value::Null) => false,
            Some(v) => v.as_bool().ok_or_else(|| error(format!("use_rslora must be true or false, found {v}")))?,
        };
        configs.insert(component, PeftConfig { lora_alpha, alpha_pattern, use_rslora });
    }
    Ok(configs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(alpha: f32, pattern: &[(&str, f32)], rslora: bool) -> PeftConfig {
        PeftConfig { lora_alpha: alpha, alpha_pattern: pattern.iter().map(|(k, a)| (k.to_string(), *a)).collect(), use_rslora: rslora }
    }

    #[test]
    fn peft_alpha_patterns_match_like_peft() {
        let c = config(8.0, &[("^mid.to_k", 2.0), ("attn2.to_k", 3.0)], false);
        assert_eq!(c.alpha("mid.to_k", 4), 2.0);
        assert_eq!(c.alpha("up.mid.to_k", 4), 8.0);
        assert_eq!(c.alpha("down.attn2.to_k", 4), 3.0);
        assert_eq!(c.alpha("down.xattn2.to_k", 4), 8.0);
        assert_eq!(config(2.0, &[], true).alpha("x", 16), 8.0);
    }

    #[test]
    fn shapes_against_linear_and_conv_targets() {
        let t = LoraTarget::new(LoraComponent::Unet, "x");
        let check = |w: &[usize], d: &[usize], u: &[usize]| check_shapes(&t, w, ("d", d), ("u", u)).iter().map(|m| format!("{m}")).collect::<Vec<_>>();
        assert!(check(&[8, 6], &[2, 6], &[8, 2]).is_empty());
        assert!(check(&[8, 6], &[2, 6, 1, 1], &[8, 2, 1, 1]).is_empty());
        assert!(check(&[8, 6, 1, 1], &[2, 6], &[8, 2]).is_empty());
        assert!(check(&[8, 6, 3, 3], &[2, 6, 3, 3], &[8, 2, 1, 1]).is_empty());
        assert_eq!(check(&[8, 6, 3, 3], &[2, 6], &[8, 2]), ["d is [2, 6], expected [r, 6, 3, 3]"]);
        assert_eq!(check(&[8, 6], &[2, 5], &[7, 2]), ["d is [2, 5], expected [r, 6]", "u is [7, 2], expected [8, r]"]);
        assert_eq!(check(&[8, 6, 1, 1], &[2, 6, 1, 1], &[8, 3, 1, 1]), ["u is [8, 3, 1, 1], expected [8, 2, 1, 1]"]);
        assert_eq!(check(&[8, 6], &[0, 6], &[8, 0]), ["d is [0, 6], expected [r, 6]", "u is [8, 0], expected [8, r]"]);
        assert_eq!(check(&[8], &[2, 6], &[8, 2]), ["d is [2, 6], expected no LoRA: unet.x has weight shape [8], not a Linear or Conv2d layer"]);
    }
}
