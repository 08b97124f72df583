use std::collections::BTreeMap;
use std::rc::Rc;

use crate::{DType, Tensor32, WeightError, WeightFile};

/// One model component's tensors under their diffusers names (e.g.
/// `down_blocks.0.resnets.0.conv1.weight`), each read from a key of one shared file. Components
/// split from one single-file checkpoint share its bytes through the `Rc`.
pub struct Component {
    file: Rc<WeightFile>,
    tensors: BTreeMap<String, Source>,
}

/// Where a diffusers-named tensor lives in the file, and its shape as the model sees it (which
/// differs from the stored shape only by dropped size-1 dimensions, so the data is unchanged).
pub(crate) struct Source {
    pub key: String,
    pub shape: Vec<usize>,
}

impl Component {
    /// A diffusers folder's file: its keys already are the diffusers names.
    pub fn from_file(file: Rc<WeightFile>) -> Self {
        let tensors = file
            .keys()
            .filter_map(|k| {
                let shape = file.info(k)?.shape.clone();
                Some((k.to_owned(), Source { key: k.to_owned(), shape }))
            })
            .collect();
        Self { file, tensors }
    }

    /// Every `Source` key must be a loadable tensor of `file` whose element count matches.
    pub(crate) fn new(file: Rc<WeightFile>, tensors: BTreeMap<String, Source>) -> Self {
        Self { file, tensors }
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// The shape under this name (after any reshape).
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        self.tensors.get(key).map(|s| s.shape.clone())
    }

    /// The stored element type.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        let source = self.tensors.get(key)?;
        self.file.info(&source.key).map(|i| i.dtype)
    }

    pub fn load_f32(&self, key: &str) -> Result<Tensor32, WeightError> {
        let shape = self.shape(key).ok_or_else(|| WeightError::Missing { file: self.file.name().to_owned(), tensor: key.to_owned() })?;
        let data = self.load_f32_elements(key, 0..shape.iter().product())?;
        Ok(Tensor32 { shape, data })
    }

    /// Elements `range` (row-major) of the tensor: a large one can be loaded in parts.
    pub fn load_f32_elements(&self, key: &str, range: std::ops::Range<usize>) -> Result<Vec<f32>, WeightError> {
        let Some(source) = self.tensors.get(key) else {
            return Err(WeightError::Missing { file: self.file.name().to_owned(), tensor: key.to_owned() });
        };
        self.file.load_f32_elements(&source.key, range).map_err(|e| WeightError::Mapped { name: key.to_owned(), key: source.key.clone(), source: Box::new(e) })
    }

    pub fn file_name(&self) -> &str {
        self.file.name()
    }
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component").field("file", &self.file.name()).field("tensors", &self.tensors.len()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fixtures, safetensors_file};
    use half::{bf16, f16};

    fn renamed() -> Component {
        let bytes = safetensors_file(&[("old.w", "F32", &[2, 2, 1, 1], vec![0; 16])], None);
        let file = Rc::new(WeightFile::from_bytes("ckpt.safetensors", bytes).unwrap());
        let source = Source { key: "old.w".into(), shape: vec![2, 2] };
        Component::new(file, [("new.weight".to_string(), source)].into())
    }

    #[test]
    fn renamed_tensors_load_with_their_new_shape() {
        let c = renamed();
        assert_eq!(c.keys().collect::<Vec<_>>(), ["new.weight"]);
        assert_eq!(c.shape("new.weight"), Some(vec![2, 2]));
        assert_eq!(c.dtype("new.weight"), Some(DType::F32));
        assert_eq!(c.load_f32("new.weight").unwrap().shape, vec![2, 2]);
        assert_eq!(c.file_name(), "ckpt.safetensors");
        assert_eq!(c.shape("old.w"), None);
    }

    #[test]
    fn errors_name_the_file_and_both_names() {
        let c = renamed();
        assert_eq!(c.load_f32("x").unwrap_err().to_string(), "ckpt.safetensors: no tensor x");
        let bytes = safetensors_file(&[("old", "I32", &[1], vec![0; 4])], None);
        let file = Rc::new(WeightFile::from_bytes("ckpt.safetensors", bytes).unwrap());
        let source = Source { key: "old".into(), shape: vec![1] };
        let c = Component::new(file, [("new".to_string(), source)].into());
        let e = c.load_f32("new").unwrap_err().to_string();
        assert_eq!(
            e,
            "tensor new (stored as old): ckpt.safetensors: tensor old has dtype I32; \
             only F32, F16 and BF16 can be loaded"
        );
    }

    /// `.fp16` (and bf16) variant files load through the same API, converted exactly.
    #[test]
    fn half_precision_variants_of_a_diffusers_file() {
        let path = fixtures().join("tiny-pixel/vae/diffusion_pytorch_model.safetensors");
        let full = Component::from_file(Rc::new(WeightFile::open(&path).unwrap()));
        for (dtype, name) in [(DType::F16, "fp16"), (DType::BF16, "bf16")] {
            let mut tensors = Vec::new();
            let mut expected = BTreeMap::new();
            for key in full.keys() {
                let t = full.load_f32(key).unwrap();
                let (bits, rounded): (Vec<u16>, Vec<f32>) = match dtype {
                    DType::F16 => t.data.iter().map(|&v| f16::from_f32(v)).map(|h| (h.to_bits(), h.to_f32())).unzip(),
                    _ => t.data.iter().map(|&v| bf16::from_f32(v)).map(|h| (h.to_bits(), h.to_f32())).unzip(),
                };
                let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
                tensors.push((key.to_owned(), t.shape, bytes));
                expected.insert(key.to_owned(), rounded);
            }
            let spec: Vec<_> = tensors.iter().map(|(k, s, b)| (k.as_str(), dtype.name(), s.as_slice(), b.clone())).collect();
            let file_name = format!("diffusion_pytorch_model.{name}.safetensors");
            let file = WeightFile::from_bytes(file_name, safetensors_file(&spec, None)).unwrap();
            let variant = Component::from_file(Rc::new(file));
            assert!(variant.keys().eq(full.keys()));
            for key in variant.keys() {
                assert_eq!(variant.dtype(key), Some(dtype));
                assert_eq!(variant.shape(key), full.shape(key));
                let got = variant.load_f32(key).unwrap().data;
                assert!(got.iter().map(|v| v.to_bits()).eq(expected[key].iter().map(|v| v.to_bits())));
            }
        }
    }
}
