//! Filling a module's parameters from diffusers-named tensors: a pure name map.
//!
//! A module's parameter path (its field names joined by `.`, Vec indices included) is the
//! diffusers weight name. Two exceptions are spelled out in [`diffusers_name`].

use std::collections::BTreeSet;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{DType, Tensor, TensorData};
use seal_weights::Component;

use crate::ModelError;

/// How the loader stores a model's matrices, convolution kernels and embedding tables (its
/// weights of two or more dimensions: nearly all of its bytes). Biases and norms, and every
/// activation, stay f32; a layer computes in its weight's precision (`layers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Every weight widened to f32.
    #[default]
    F32,
    /// f16 where the file stores f16, so that an f16 model keeps its size on the device.
    AsStored,
    /// f16 whatever the file stores (f32 and bf16 rounded to the nearest f16).
    F16,
}

impl Precision {
    /// The bytes one element of a `rank`-dimensional weight stored `dtype` in the file takes.
    pub fn bytes(self, stored: seal_weights::DType, rank: usize) -> u64 {
        if self.half(stored, rank) { 2 } else { 4 }
    }

    fn half(self, stored: seal_weights::DType, rank: usize) -> bool {
        rank >= 2 && (self == Precision::F16 || (self == Precision::AsStored && stored == seal_weights::DType::F16))
    }
}

/// Loads every parameter of `module` from `weights`. Returns the module and the keys of
/// `weights` that no parameter asked for (shown to the user; not an error).
pub fn load_module<M: Module>(module: M, weights: &Component, precision: Precision) -> Result<(M, Vec<String>), ModelError> {
    load_module_where(module, weights, &|_| true, precision)
}

/// `load_module` for the parameters whose diffusers name `wanted` accepts; the others stay
/// lazy (never allocated) and are neither missing nor unused.
pub fn load_module_where<M: Module>(module: M, weights: &Component, wanted: &dyn Fn(&str) -> bool, precision: Precision) -> Result<(M, Vec<String>), ModelError> {
    let mut loader = Loader { weights, wanted, precision, path: Vec::new(), used: BTreeSet::new(), missing: Vec::new(), errors: Vec::new(), pending: 0 };
    let module = module.map(&mut loader);
    if let Some(first) = loader.errors.into_iter().next() {
        return Err(first);
    }
    if !loader.missing.is_empty() {
        return Err(ModelError::MissingTensors { file: weights.file_name().to_string(), names: loader.missing });
    }
    let unused = weights.keys().filter(|k| wanted(k) && !loader.used.contains(*k)).map(str::to_string).collect();
    Ok((module, unused))
}

/// `Module::valid` (the same weights off the autodiff device) for the parameters that hold
/// values; the lazy ones of a model loaded in part stay lazy instead of being filled.
pub fn valid_loaded<M: Module>(module: M) -> M {
    module.map(&mut ValidLoaded)
}

struct ValidLoaded;

impl ModuleMapper for ValidLoaded {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if param.is_initialized() { param.valid() } else { param }
    }
}

/// `module` with its weights of two or more dimensions in f16 (`Precision::F16` for a model
/// made, not loaded: the benchmarks' random-weight models). Lazy parameters stay lazy.
pub fn half_weights<M: Module>(module: M) -> M {
    module.map(&mut HalfWeights)
}

struct HalfWeights;

impl ModuleMapper for HalfWeights {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if D >= 2 && param.is_initialized() { param.map(|t| t.cast(DType::F16)) } else { param }
    }
}

/// Every parameter's diffusers name and shape, without allocating the parameters.
pub fn parameter_shapes<M: Module>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut v = ParamLister { path: Vec::new(), values: false, out: Vec::new() };
    module.visit(&mut v);
    v.out.into_iter().map(|(name, shape, _)| (name, shape)).collect()
}

/// Every parameter's diffusers name, shape and values (read back from the device): what a
/// trained module is saved from, the inverse of [`load_module`].
pub async fn parameter_values<M: Module>(module: &M) -> Result<Vec<(String, Vec<usize>, Vec<f32>)>, String> {
    let mut v = ParamLister { path: Vec::new(), values: true, out: Vec::new() };
    module.visit(&mut v);
    let mut out = Vec::with_capacity(v.out.len());
    for (name, shape, values) in v.out {
        let values = values.expect("asked for values");
        let data = crate::read_back(values).await.map_err(|e| format!("{name}: {e}"))?;
        out.push((name, shape, data));
    }
    Ok(out)
}

/// The total number of scalar parameters (from lazy shapes; nothing is allocated).
pub fn parameter_count<M: Module>(module: &M) -> usize {
    parameter_shapes(module).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// The diffusers name of a Burn module path: enum variants (CamelCase segments, which pick a
/// layer kind such as conv vs linear projection) are not part of it, and `net_0`/`net_2` stand
/// for diffusers' `net.0`/`net.2`, which are not Rust identifiers.
pub fn diffusers_name(burn_path: &str) -> String {
    burn_path
        .split('.')
        .filter(|s| !s.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|s| match s {
            "net_0" => "net.0",
            "net_2" => "net.2",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

struct Loader<'a> {
    weights: &'a Component,
    wanted: &'a dyn Fn(&str) -> bool,
    precision: Precision,
    path: Vec<String>,
    used: BTreeSet<String>,
    missing: Vec<String>,
    errors: Vec<ModelError>,
    /// Bytes handed to the device since its queue was last flushed.
    pending: usize,
}

/// A lazy backend (Burn's fusion on WebGPU) keeps each new tensor's data in (wasm) memory until
/// its queue runs; flushing every this many bytes bounds that to one slice of the model.
const FLUSH_BYTES: usize = 64 << 20;

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = diffusers_name(&self.path.join("."));
        if !(self.wanted)(&key) {
            return param;
        }
        let expected = param.lazy_shape().to_vec();
        let Some(found) = self.weights.shape(&key) else {
            self.missing.push(key);
            return param;
        };
        if found != expected {
            self.errors.push(ModelError::Shape { file: self.weights.file_name().to_string(), tensor: key, expected, found });
            return param;
        }
        // Large tensors go to the device in slices of rows, joined there, so that the host
        // copies an upload makes stay small (wasm memory never shrinks).
        let rows = expected.first().copied().unwrap_or(1).max(1);
        let row = expected.iter().product::<usize>() / rows;
        let stored = self.weights.dtype(&key).unwrap_or(seal_weights::DType::F32);
        let size = self.precision.bytes(stored, D) as usize;
        let per_slice = (FLUSH_BYTES / size / row.max(1)).clamp(1, rows);
        let device = param.lazy_device();
        let mut slices = vec![];
        for start in (0..rows).step_by(per_slice) {
            let end = (start + per_slice).min(rows);
            let data = match self.weights.load_f32_elements(&key, start * row..end * row) {
                Ok(data) => data,
                Err(e) => {
                    self.errors.push(e.into());
                    return param;
                }
            };
            if let Some(bad) = data.iter().position(|x| !x.is_finite()) {
                self.errors.push(ModelError::NonFinite { file: self.weights.file_name().to_string(), tensor: key, index: start * row + bad });
                return param;
            }
            let mut shape = expected.clone();
            shape[0] = end - start;
            self.pending += size * data.len();
            let slice = if size == 2 {
                if let Some(big) = data.iter().position(|x| x.abs() > f32::from(half::f16::MAX)) {
                    self.errors.push(ModelError::HalfRange { file: self.weights.file_name().to_string(), tensor: key, value: data[big] });
                    return param;
                }
                let half: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                Tensor::from_data(TensorData::new(half, shape), (&device, DType::F16))
            } else {
                Tensor::from_data(TensorData::new(data, shape), &device)
            };
            slices.push(slice);
            if self.pending >= FLUSH_BYTES {
                self.pending = 0;
                if let Err(e) = device.flush() {
                    self.errors.push(ModelError::Io { file: self.weights.file_name().to_string(), message: format!("the device failed while loading {key}: {e:?}") });
                    return param;
                }
            }
        }
        self.used.insert(key);
        let tensor = if slices.len() == 1 { slices.remove(0) } else { Tensor::cat(slices, 0) };
        let id = param.id;
        param.transform_for_load(tensor, id)
    }
}

/// Every parameter's diffusers name and shape, and with `values` its values (flattened; this
/// allocates lazy parameters, so `parameter_shapes` asks for none).
struct ParamLister {
    path: Vec<String>,
    values: bool,
    out: Vec<(String, Vec<usize>, Option<Tensor<1>>)>,
}

impl ModuleVisitor for ParamLister {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let shape = param.lazy_shape().to_vec();
        let values = self.values.then(|| param.val().reshape([shape.iter().product::<usize>()]));
        self.out.push((diffusers_name(&self.path.join(".")), shape, values));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::clip::{ClipTextConfig, ClipTextModel};
    use crate::testutil::{device, fixtures};
    use crate::unet::{UNet2DConditionModel, UNetConfig};
    use crate::vae::{AutoencoderKL, VaeConfig};

    /// (config, name -> shape, parameter count) of a layout file made by diffusers/transformers.
    fn layout(name: &str) -> (serde_json::Value, BTreeMap<String, Vec<usize>>, usize) {
        let text = std::fs::read_to_string(fixtures().join("layouts").join(name)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let tensors = serde_json::from_value(v["tensors"].clone()).unwrap();
        (v["config"].clone(), tensors, v["n_params"].as_u64().unwrap() as usize)
    }

    fn assert_layout<M: Module>(module: &M, name: &str) {
        let (_, expected, n_params) = layout(name);
        let ours: BTreeMap<String, Vec<usize>> = parameter_shapes(module).into_iter().collect();
        let missing: Vec<_> = expected.keys().filter(|k| !ours.contains_key(*k)).collect();
        let extra: Vec<_> = ours.keys().filter(|k| !expected.contains_key(*k)).collect();
        assert!(missing.is_empty() && extra.is_empty(), "{name}: missing {missing:?}, extra {extra:?}");
        for (k, shape) in &expected {
            assert_eq!(&ours[k], shape, "{name}: {k}");
        }
        assert_eq!(parameter_count(module), n_params, "{name}: parameter count");
    }

    #[test]
    fn unets_match_diffusers_layouts() {
        for name in ["unet_sd15.json", "unet_bk_sdm_tiny.json", "unet_bk_sdm_small.json"] {
            let config: UNetConfig = UNetConfig::from_json(&layout(name).0.to_string()).unwrap();
            // Lazy parameters: nothing is allocated for these 0.3-0.9 B parameter models.
            assert_layout(&UNet2DConditionModel::new(&config, &device()), name);
        }
    }

    #[test]
    fn vae_and_text_encoder_match_layouts() {
        let vae = VaeConfig::from_json(&layout("vae_sd15.json").0.to_string()).unwrap();
        assert_eq!(vae, VaeConfig { scaling_factor: 0.18215, ..VaeConfig::sd() });
        assert_layout(&AutoencoderKL::new(&vae, &device()), "vae_sd15.json");
        let clip = ClipTextConfig::from_json(&layout("text_encoder_clip_vit_l14.json").0.to_string()).unwrap();
        assert_eq!(clip, ClipTextConfig::vit_l14());
        assert_layout(&ClipTextModel::new(&clip, &device()), "text_encoder_clip_vit_l14.json");
    }
}
