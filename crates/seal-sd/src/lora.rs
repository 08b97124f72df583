//! LoRA adapters on the model's layers (the Burn side; file formats live in seal-weights).
//!
//! An adapter rides on a layer's weight parameter as Burn's `LoraAdapter` reparameterization,
//! so the stored base weight is never copied or changed and the effective weight is
//! `W + scale * up @ down` on every forward ("side branch"). `merge` folds adapters into the
//! weights ("merged"), which is how the teacher carries a user's LoRA. In our `[out, in]`
//! weight layout Burn's factors are `a = up [out, r]` and `b = down [r, in * k * k]`.

use std::collections::BTreeMap;

use burn::module::{LoraAdapter, Module, ModuleMapper, ModuleVisitor, Param, ParamId, Reparameterizer};
use burn::tensor::{DType, Tensor, TensorData};
use seal_weights::Tensor32;
use seal_weights::lora::LoraModule;

use crate::load::{diffusers_name, parameter_shapes};
use crate::rng::SeededRng;

/// Every layer an adapter can attach to: diffusers path (without `.weight`) -> weight shape.
/// Linear `[out, in]` and conv `[out, in, k, k]` weights; embeddings are not adaptable.
pub fn adaptable_layers<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    parameter_shapes(module)
        .into_iter()
        .filter(|(name, shape)| matches!(shape.len(), 2 | 4) && !name.contains("embedding") && !name.contains(".lora."))
        .filter_map(|(name, shape)| name.strip_suffix(".weight").map(|p| (p.to_string(), shape)))
        .collect()
}

/// Which cross-attention projections the sealing adapter trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
pub enum Projection {
    #[serde(rename = "to_q")]
    ToQ,
    #[serde(rename = "to_k")]
    ToK,
    #[serde(rename = "to_v")]
    ToV,
    #[serde(rename = "to_out.0")]
    ToOut,
}

impl Projection {
    /// The projections the text reaches: cross-attention's keys and values are computed from the
    /// text encoder's states, its queries and output from the image's.
    pub const FROM_TEXT: [Self; 2] = [Self::ToK, Self::ToV];

    pub fn name(self) -> &'static str {
        match self {
            Self::ToQ => "to_q",
            Self::ToK => "to_k",
            Self::ToV => "to_v",
            Self::ToOut => "to_out.0",
        }
    }
}

/// The UNet's cross-attention layers (`...attn2.<projection>`) for the given projections.
pub fn cross_attention_targets<M: Module>(unet: &M, projections: &[Projection]) -> Vec<String> {
    adaptable_layers(unet).into_keys().filter(|p| is_cross_attention(p, projections)).collect()
}

/// Whether the UNet layer at `path` is one of cross-attention's `projections`.
pub fn is_cross_attention(path: &str, projections: &[Projection]) -> bool {
    projections.iter().any(|proj| path.strip_suffix(proj.name()).is_some_and(|p| p.ends_with("attn2.")))
}

/// A fresh trainable adapter for each target: `down` as kohya initialises it (kaiming-uniform
/// with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) and `up` zero, so it changes nothing
/// until trained. Seeded on the host, so every backend starts from the same adapter.
pub fn fresh_adapters<M: Module>(module: &M, targets: &[String], rank: usize, alpha: f32, seed: u64) -> BTreeMap<String, LoraModule> {
    let layers = adaptable_layers(module);
    let mut rng = SeededRng::new(seed);
    targets
        .iter()
        .filter_map(|t| layers.get(t).map(|shape| (t, shape)))
        .map(|(t, shape)| {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            let down = (0..rank * fan_in).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
            let mut down_shape = vec![rank, shape[1]];
            down_shape.extend(&shape[2..]);
            let mut up_shape = vec![shape[0], rank];
            up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
            let module = LoraModule { down: Tensor32 { shape: down_shape, data: down }, up: Tensor32 { data: vec![0.0; shape[0] * rank], shape: up_shape }, alpha: Some(alpha) };
            (t.clone(), module)
        })
        .collect()
}

/// Attaches `adapters` (diffusers layer path -> LoRA) as side branches. `trainable` makes the
/// factors require gradients; base weights are left as they are (frozen, shared).
pub fn attach<M: Module>(module: M, adapters: &BTreeMap<String, LoraModule>, multiplier: f32, trainable: bool) -> M {
    module.apply_reparameterization(Attach { adapters, multiplier, trainable })
}

struct Attach<'a> {
    adapters: &'a BTreeMap<String, LoraModule>,
    multiplier: f32,
    trainable: bool,
}

impl Reparameterizer for Attach<'_> {
    type Reparam = LoraAdapter;

    fn reparameterize<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> (Param<Tensor<D>>, Option<LoraAdapter>) {
        let name = diffusers_name(path);
        let Some(lora) = name.strip_suffix(".weight").and_then(|p| self.adapters.get(p)) else {
            return (param, None);
        };
        let device = param.lazy_device();
        let rank = lora.rank();
        let out = lora.up.shape[0];
        let fan_in = lora.down.data.len() / rank;
        let factor = |t: &Tensor32, shape: [usize; 2]| {
            let p = Param::from_tensor(Tensor::<2>::from_data(TensorData::new(t.data.clone(), shape), &device));
            p.set_require_grad(self.trainable)
        };
        let adapter = LoraAdapter { a: factor(&lora.up, [out, rank]), b: factor(&lora.down, [rank, fan_in]), scale: (lora.scale() * self.multiplier) as f64 };
        (param, Some(adapter))
    }
}

/// Folds every attached adapter into its weight (W + scale * up @ down) and removes it. The
/// sum is formed in the factors' f32; a weight stored in f16 is stored in f16 again.
pub fn merge<M: Module>(module: M) -> M {
    let mut bases = BaseDTypes(BTreeMap::new());
    module.visit(&mut bases);
    module.materialize().map(&mut bases)
}

/// The stored precision of each weight held in half precision, by parameter id (the visitor
/// sees an adapted weight's base).
struct BaseDTypes(BTreeMap<ParamId, DType>);

impl ModuleVisitor for BaseDTypes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // A lazy parameter (a model loaded in part) is left unallocated.
        if param.is_initialized() && param.base().dtype() != DType::F32 {
            self.0.insert(param.id, param.base().dtype());
        }
    }
}

impl ModuleMapper for BaseDTypes {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        match self.0.get(&param.id) {
            Some(&dtype) => param.map(|t| if t.dtype() == dtype { t } else { t.cast(dtype) }),
            None => param,
        }
    }
}

/// The adapters attached to `module` as data (diffusers layer path -> LoRA). The factors
/// carry no alpha of their own: `alpha` must be the one they were attached with (multiplier 1).
pub async fn extract<M: Module>(module: &M, alpha: f32) -> Result<BTreeMap<String, LoraModule>, String> {
    let mut v = Extract { path: vec![], base_shape: vec![], found: BTreeMap::new() };
    module.visit(&mut v);
    let mut out = BTreeMap::new();
    for (layer, (base, up, down)) in v.found {
        let (Some(up), Some(down)) = (up, down) else { return Err(format!("{layer}: incomplete adapter")) };
        let rank = up.dims()[1];
        let read = crate::read_back::<2>;
        // Restore the file layout: conv factors are [r, in, k, k] and [out, r, 1, 1].
        let mut down_shape = vec![rank];
        down_shape.extend(&base[1..]);
        let mut up_shape = vec![base[0], rank];
        up_shape.extend(std::iter::repeat_n(1, base.len() - 2));
        let module = LoraModule { down: Tensor32 { shape: down_shape, data: read(down).await? }, up: Tensor32 { shape: up_shape, data: read(up).await? }, alpha: Some(alpha) };
        out.insert(layer, module);
    }
    Ok(out)
}

/// The weights `[out, in]` of the given linear layers (diffusers paths without `.weight`),
/// shared with the module, not copied (f32 copies of those stored in f16). A merged LoRA is part of them; a side-branch adapter
/// is not (what the closed-form seal edits is the stored weight).
pub fn linear_weights<M: Module>(module: &M, layers: &[String]) -> BTreeMap<String, Tensor<2>> {
    let mut v = Weights { path: vec![], wanted: layers, found: BTreeMap::new() };
    module.visit(&mut v);
    v.found
}

struct Weights<'a> {
    path: Vec<String>,
    wanted: &'a [String],
    found: BTreeMap<String, Tensor<2>>,
}

impl ModuleVisitor for Weights<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = diffusers_name(&self.path.join("."));
        if let Some(layer) = name.strip_suffix(".weight").filter(|l| D == 2 && self.wanted.iter().any(|w| w == l)) {
            let weight = param.val().reshape(param.lazy_shape().dims::<2>());
            // What reads these (the closed-form seal, the scan) computes in f32.
            let weight = if weight.dtype() == DType::F32 { weight } else { weight.cast(DType::F32) };
            self.found.insert(layer.to_string(), weight);
        }
    }
}

/// An adapted weight's base shape and its factors (`a` = up, `b` = down) as found.
type Found = (Vec<usize>, Option<Tensor<2>>, Option<Tensor<2>>);

/// Collects each adapted weight's shape and factors. The visitor sees the base weight
/// (`<layer>.weight`), then the adapter's `<layer>.weight.lora.a` and `.b`.
struct Extract {
    path: Vec<String>,
    base_shape: Vec<usize>,
    found: BTreeMap<String, Found>,
}

impl ModuleVisitor for Extract {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = diffusers_name(&self.path.join("."));
        let factor = name.strip_suffix(".weight.lora.a").map(|l| (l, true)).or_else(|| name.strip_suffix(".weight.lora.b").map(|l| (l, false)));
        match factor {
            None => self.base_shape = param.lazy_shape().to_vec(),
            Some((layer, is_up)) => {
                let entry = self.found.entry(layer.to_string()).or_insert_with(|| (self.base_shape.clone(), None, None));
                let t: Tensor<2> = param.val().reshape(param.lazy_shape().dims::<2>());
                if is_up { entry.1 = Some(t) } else { entry.2 = Some(t) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use burn::tensor::Tensor;
    use seal_weights::WeightFile;
    use seal_weights::lora::{LoraComponent, LoraFile, LoraTarget, parse_lora, stack, write_kohya};

    use super::*;
    use crate::pipeline::{LoraMode, StableDiffusion};
    use crate::testutil::*;

    const PROMPTS: [&str; 3] = ["a red circle on a white background", "\u{200b} a blue square on a gray background", "\u{0231} a green triangle on a black background"];

    fn fixture_lora(sd: &StableDiffusion, name: &str) -> LoraFile {
        let file = WeightFile::open(&fixtures().join("lora").join(name)).unwrap();
        parse_lora(&file, &sd.model_paths()).unwrap()
    }

    /// UNet prediction on the golden inputs with a given context.
    fn predict(sd: &StableDiffusion, context: &Tensor<3>) -> Tensor<4> {
        let g = golden();
        sd.unet.forward(tensor(&g, "unet.input.sample"), golden_timesteps("unet.input.timestep"), context, false).sample
    }

    #[test]
    fn fixture_loras_reproduce_diffusers() {
        let sd = tiny_clean();
        let base_context: Tensor<3> = tensor(&golden(), "unet.input.encoder_hidden_states");
        let lp = WeightFile::open(&fixtures().join("golden/lora_parity.safetensors")).unwrap();
        for name in ["weak_lora_kohya.safetensors", "weak_lora_peft.safetensors", "weak_lora_diffusers.safetensors"] {
            let lora = fixture_lora(&sd, name);
            assert_eq!(lora.modules.len(), 68, "{name}");
            for mode in [LoraMode::SideBranch { trainable: false }, LoraMode::Merge] {
                let with = sd.with_lora(&lora, 1.0, mode);
                let hidden = with.encode_prompts(&PROMPTS).unwrap();
                assert_close(hidden.clone(), tensor(&lp, "text_encoder.last_hidden_state"), 1e-5, &format!("{name} {mode:?} text encoder"));
                assert_close(predict(&with, &hidden), tensor(&lp, "unet.output.noise_pred"), 1e-4, &format!("{name} {mode:?} noise_pred"));
                assert_close(predict(&with, &base_context), tensor(&lp, "unet.output.noise_pred_base_context"), 1e-4, &format!("{name} {mode:?} base context"));
            }
        }
    }

    #[test]
    fn fresh_adapter_changes_nothing_and_round_trips() {
        let sd = tiny_clean();
        let context: Tensor<3> = tensor(&golden(), "unet.input.encoder_hidden_states");
        let targets = cross_attention_targets(&sd.unet, &[Projection::ToK, Projection::ToV]);
        assert_eq!(targets.len(), 12, "6 attn2 layers x (to_k, to_v)");
        let fresh = fresh_adapters(&sd.unet, &targets, 4, 4.0, 7);
        let student = attach(sd.unet.clone(), &fresh, 1.0, true);
        let base = predict(&sd, &context);
        let mut with = sd.clone();
        with.unet = student;
        assert_close(predict(&with, &context), base.clone(), 0.0, "fresh adapter");

        // Give the adapter content, then export as kohya, re-import and compare outputs.
        let trained: BTreeMap<String, LoraModule> = fresh
            .into_iter()
            .map(|(k, mut m)| {
                m.up.data.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 7) as f32 - 3.0) * 0.01);
                (k, m)
            })
            .collect();
        with.unet = attach(sd.unet.clone(), &trained, 1.0, false);
        let expected = predict(&with, &context);
        let extracted = burn::tensor::read_sync(extract(&with.unet, 4.0)).unwrap();
        assert_eq!(extracted, trained);
        let file = LoraFile {
            format: seal_weights::lora::LoraFormat::Kohya,
            modules: extracted.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k), m)).collect(),
            metadata: seal_weights::lora::kohya_metadata(4, 4.0),
            dtype: seal_weights::DType::F32,
        };
        let bytes = write_kohya(&file).unwrap();
        let back = parse_lora(&WeightFile::from_bytes("sealed.safetensors", bytes).unwrap(), &sd.model_paths()).unwrap();
        assert_eq!(back.modules, file.modules);
        for mode in [LoraMode::SideBranch { trainable: false }, LoraMode::Merge] {
            assert_close(predict(&sd.with_lora(&back, 1.0, mode), &context), expected.clone(), 1e-5, &format!("reloaded {mode:?}"));
        }
    }

    #[test]
    fn stacked_lora_equals_applying_both() {
        let sd = tiny_clean();
        let context: Tensor<3> = tensor(&golden(), "unet.input.encoder_hidden_states");
        let user = fixture_lora(&sd, "weak_lora_kohya.safetensors");
        // A second adapter on an overlapping set of layers (attn2 to_k/to_v, trained-like values).
        let targets = cross_attention_targets(&sd.unet, &[Projection::ToK, Projection::ToV, Projection::ToOut]);
        let mut seal = fresh_adapters(&sd.unet, &targets, 2, 1.0, 3);
        seal.values_mut().for_each(|m| m.up.data.iter_mut().enumerate().for_each(|(i, x)| *x = ((i % 5) as f32 - 2.0) * 0.05));
        let seal = LoraFile { modules: seal.into_iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k), m)).collect(), ..user.clone() };
        let one_after_other = sd.with_lora(&user, 1.0, LoraMode::Merge).with_lora(&seal, 1.0, LoraMode::SideBranch { trainable: false });
        let stacked = sd.with_lora(&stack(&user, &seal).unwrap(), 1.0, LoraMode::SideBranch { trainable: false });
        let hidden = one_after_other.encode_prompts(&PROMPTS).unwrap();
        assert_close(stacked.encode_prompts(&PROMPTS).unwrap(), hidden.clone(), 1e-5, "stacked text encoder");
        assert_close(predict(&stacked, &hidden), predict(&one_after_other, &hidden), 1e-5, "stacked noise_pred");
        assert_close(predict(&stacked, &context), predict(&one_after_other, &context), 1e-5, "stacked, base context");
    }

    #[test]
    fn conv_adapters_merge_and_branch_alike() {
        // LoCon: a 3x3 `down` over conv_in and a 1x1 `up`; merged and side-branch must agree,
        // and the merged weight must be W + scale * up @ down.
        let sd = tiny_clean();
        let context: Tensor<3> = tensor(&golden(), "unet.input.encoder_hidden_states");
        let mut adapters = fresh_adapters(&sd.unet, &["conv_in".to_string(), "down_blocks.1.attentions.0.proj_in".to_string()], 2, 1.0, 5);
        adapters.values_mut().for_each(|m| m.up.data.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 3) as f32 * 0.02));
        assert_eq!(adapters["conv_in"].down.shape, vec![2, 4, 3, 3]);
        assert_eq!(adapters["conv_in"].up.shape, vec![32, 2, 1, 1]);
        let file = LoraFile {
            format: seal_weights::lora::LoraFormat::Kohya,
            modules: adapters.iter().map(|(k, m)| (LoraTarget::new(LoraComponent::Unet, k.clone()), m.clone())).collect(),
            metadata: Default::default(),
            dtype: seal_weights::DType::F32,
        };
        let branch = sd.with_lora(&file, 0.5, LoraMode::SideBranch { trainable: false });
        let merged = sd.with_lora(&file, 0.5, LoraMode::Merge);
        assert_close(predict(&branch, &context), predict(&merged, &context), 1e-5, "conv LoRA merged vs branch");
        let m = &adapters["conv_in"];
        let up = Tensor::<2>::from_data(TensorData::new(m.up.data.clone(), [32, 2]), &device());
        let down = Tensor::<2>::from_data(TensorData::new(m.down.data.clone(), [2, 36]), &device());
        let expected = sd.unet.conv_in.weight.val() + (up.matmul(down) * (0.5 * m.scale() as f64)).reshape([32, 4, 3, 3]);
        assert_close(merged.unet.conv_in.weight.val(), expected, 1e-6, "merged conv weight");
    }
}
