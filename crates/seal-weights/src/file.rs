use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;
use std::sync::Mutex;

use crate::header::{self, Entry};
use crate::{DType, WeightError};

/// Where a file's bytes come from, read a range at a time so that a checkpoint of gigabytes is
/// never held whole: a file on disk, a browser `Blob`, or bytes already in memory.
pub trait ByteSource {
    fn len(&self) -> u64;

    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of `range`, which lies within `0..len()`.
    fn read(&self, range: Range<u64>) -> Result<Vec<u8>, String>;

    /// Every byte (for small files: configs, tokenizers).
    fn read_all(&self) -> Result<Vec<u8>, String> {
        self.read(0..self.len())
    }
}

impl ByteSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read(&self, range: Range<u64>) -> Result<Vec<u8>, String> {
        self.get(range.start as usize..range.end as usize).map(<[u8]>::to_vec).ok_or_else(|| format!("bytes {range:?} are beyond the {} bytes held", self.as_slice().len()))
    }
}

/// Bytes read from a source at once while loading a tensor.
const READ_CHUNK: u64 = 8 << 20;

/// A file on disk, read where asked.
pub struct DiskFile {
    file: Mutex<std::fs::File>,
    len: u64,
}

impl DiskFile {
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        let io = |source| WeightError::Io { file: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(Self { file: Mutex::new(file), len })
    }
}

impl ByteSource for DiskFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read(&self, range: Range<u64>) -> Result<Vec<u8>, String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = self.file.lock().map_err(|_| "an earlier read failed midway".to_string())?;
        let mut out = vec![0; (range.end - range.start) as usize];
        file.seek(SeekFrom::Start(range.start)).and_then(|_| file.read_exact(&mut out)).map_err(|e| e.to_string())?;
        Ok(out)
    }
}

/// The beginning of a safetensors file whose tensors, all of `dtype`, follow in the order of
/// `entries` (key, shape): the header length and the JSON header, padded with spaces to 8 bytes
/// as the reference writer does (so the data is aligned). Writing a file is this, then each
/// tensor's bytes, so a large file can be written a tensor at a time.
pub fn safetensors_head(dtype: DType, entries: &[(&str, &[usize])], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::json!(metadata));
    }
    let mut offset = 0;
    for (key, shape) in entries {
        let len = shape.iter().product::<usize>() * dtype.size();
        header.insert(key.to_string(), serde_json::json!({ "dtype": dtype.name(), "shape": shape, "data_offsets": [offset, offset + len] }));
        offset += len;
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out
}

/// What the header says about a float tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

/// A tensor converted to f32, row-major (C order) as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor32 {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One safetensors file with its header parsed and validated. Tensors are read and converted
/// to f32 only when loaded, one at a time, from wherever the bytes are (`ByteSource`).
pub struct WeightFile {
    name: String,
    source: Box<dyn ByteSource>,
    tensors: BTreeMap<String, Entry>,
    unsupported: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
}

impl WeightFile {
    /// Parses `bytes`; `name` (a file name or path) is what error messages call the file.
    pub fn from_bytes(name: impl Into<String>, bytes: Vec<u8>) -> Result<Self, WeightError> {
        Self::from_source(name, Box::new(bytes))
    }

    /// Reads only the header from `source`; tensors are read when loaded.
    pub fn from_source(name: impl Into<String>, source: Box<dyn ByteSource>) -> Result<Self, WeightError> {
        let name = name.into();
        let total = source.len();
        let read = |range: Range<u64>| source.read(range).map_err(|reason| WeightError::Format { file: name.clone(), reason: format!("cannot read: {reason}") });
        let first = read(0..total.min(8))?;
        let head = read(0..header::head_len(&name, &first, total)?)?;
        let header = header::parse_head(&name, &head, total)?;
        Ok(Self { name, source, tensors: header.tensors, unsupported: header.unsupported, metadata: header.metadata })
    }

    /// Opens a file on disk and parses its header; messages name it by the path as given.
    pub fn open(path: &Path) -> Result<Self, WeightError> {
        Self::from_source(path.display().to_string(), Box::new(DiskFile::open(path)?))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The loadable (F32, F16, BF16) tensors, in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, key: &str) -> Option<&TensorInfo> {
        self.tensors.get(key).map(|e| &e.info)
    }

    /// Tensors of other dtypes (key, dtype name), such as CLIP's int64 `position_ids`: valid in
    /// the file, absent from [`WeightFile::keys`], an error if loaded.
    pub fn unsupported_tensors(&self) -> impl Iterator<Item = (&str, &str)> {
        self.unsupported.iter().map(|(k, d)| (k.as_str(), d.as_str()))
    }

    /// The header's `__metadata__` (empty if it has none).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn load_f32(&self, key: &str) -> Result<Tensor32, WeightError> {
        let info = self.entry(key)?.info.clone();
        let data = self.load_f32_elements(key, 0..info.shape.iter().product())?;
        Ok(Tensor32 { shape: info.shape, data })
    }

    /// Elements `range` of a tensor (row-major), read and converted a slice at a time: a large
    /// tensor can be loaded in parts, and its bytes and its f32 values are never both whole.
    pub fn load_f32_elements(&self, key: &str, range: Range<usize>) -> Result<Vec<f32>, WeightError> {
        let entry = self.entry(key)?;
        let size = entry.info.dtype.size() as u64;
        let (first, last) = (entry.range.start + range.start as u64 * size, entry.range.start + range.end as u64 * size);
        if range.start > range.end || last > entry.range.end {
            return Err(WeightError::Tensor {
                file: self.name.clone(),
                tensor: key.to_owned(),
                reason: format!("elements {range:?} are beyond its {}", (entry.range.end - entry.range.start) / size),
            });
        }
        let step = READ_CHUNK - READ_CHUNK % size;
        let mut data = Vec::with_capacity(range.len());
        let mut at = first;
        while at < last {
            let end = (at + step).min(last);
            let bytes =
                self.source.read(at..end).map_err(|reason| WeightError::Tensor { file: self.name.clone(), tensor: key.to_owned(), reason: format!("cannot read: {reason}") })?;
            entry.info.dtype.decode_into(&bytes, &mut data);
            at = end;
        }
        Ok(data)
    }

    fn entry(&self, key: &str) -> Result<&Entry, WeightError> {
        self.tensors.get(key).ok_or_else(|| match self.unsupported.get(key) {
            Some(dtype) => WeightError::UnsupportedDType { file: self.name.clone(), tensor: key.to_owned(), dtype: dtype.clone() },
            None => WeightError::Missing { file: self.name.clone(), tensor: key.to_owned() },
        })
    }
}

/// Names and sizes only: the bytes would flood any log.
impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("name", &self.name)
            .field("bytes", &self.source.len())
            .field("tensors", &self.tensors.len())
            .field("unsupported", &self.unsupported)
            .field("metadata", &self.metadata)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{f32_bytes, safetensors_file};
    use proptest::prelude::*;

    fn small_file() -> Vec<u8> {
        let f16: Vec<u8> = [0x3c00u16, 0xc000, 0x0001].iter().flat_map(|b| b.to_le_bytes()).collect();
        let bf16: Vec<u8> = [0x3f80u16, 0x4049].iter().flat_map(|b| b.to_le_bytes()).collect();
        safetensors_file(
            &[
                ("w32", "F32", &[2, 2], f32_bytes(&[1.0, -2.0, 0.5, 3.0])),
                ("w16", "F16", &[3], f16),
                ("wbf", "BF16", &[2, 1], bf16),
                ("ids", "I64", &[2], vec![0; 16]),
                ("empty", "F32", &[0, 3], vec![]),
            ],
            Some(r#"{"format":"pt","note":"x"}"#),
        )
    }

    #[test]
    fn loads_every_float_dtype() {
        let f = WeightFile::from_bytes("small.safetensors", small_file()).unwrap();
        assert_eq!(f.name(), "small.safetensors");
        assert_eq!(f.keys().collect::<Vec<_>>(), ["empty", "w16", "w32", "wbf"]);
        assert_eq!(f.info("w16"), Some(&TensorInfo { dtype: DType::F16, shape: vec![3] }));
        assert_eq!(f.metadata()["note"], "x");
        let t = f.load_f32("w32").unwrap();
        assert_eq!((t.shape, t.data), (vec![2, 2], vec![1.0, -2.0, 0.5, 3.0]));
        assert_eq!(f.load_f32("w16").unwrap().data, vec![1.0, -2.0, 2f32.powi(-24)]);
        assert_eq!(f.load_f32("wbf").unwrap().data, vec![1.0, 3.140625]);
        assert_eq!(f.load_f32("empty").unwrap(), Tensor32 { shape: vec![0, 3], data: vec![] });
    }

    #[test]
    fn other_dtypes_are_listed_and_fail_to_load_by_name() {
        let f = WeightFile::from_bytes("small.safetensors", small_file()).unwrap();
        assert_eq!(f.unsupported_tensors().collect::<Vec<_>>(), [("ids", "I64")]);
        assert!(f.info("ids").is_none());
        assert_eq!(f.load_f32("ids").unwrap_err().to_string(), "small.safetensors: tensor ids has dtype I64; only F32, F16 and BF16 can be loaded");
        assert_eq!(f.load_f32("nope").unwrap_err().to_string(), "small.safetensors: no tensor nope");
    }

    #[test]
    fn open_reads_a_path_and_names_it_in_errors() {
        let missing = Path::new("/nonexistent/unet.safetensors");
        let e = WeightFile::open(missing).unwrap_err().to_string();
        assert!(e.starts_with("/nonexistent/unet.safetensors: cannot read"), "{e}");
        let path = crate::testutil::fixtures().join("tiny-pixel/text_encoder/model.safetensors");
        let f = WeightFile::open(&path).unwrap();
        assert!(f.name().ends_with("text_encoder/model.safetensors"));
        assert_eq!(f.keys().count(), 84);
    }

    /// Bytes in memory that count what is read of them.
    struct Counted(Vec<u8>, std::rc::Rc<std::cell::Cell<u64>>);

    impl ByteSource for Counted {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }

        fn read(&self, range: Range<u64>) -> Result<Vec<u8>, String> {
            self.1.set(self.1.get() + range.end - range.start);
            self.0.read(range)
        }
    }

    /// Opening reads the header alone, loading a tensor its bytes alone: a large file is
    /// never held whole.
    #[test]
    fn reads_only_the_header_then_each_tensor() {
        let bytes = small_file();
        let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let read = std::rc::Rc::new(std::cell::Cell::new(0));
        let f = WeightFile::from_source("small.safetensors", Box::new(Counted(bytes, read.clone()))).unwrap();
        // The 8-byte length, then the whole head (length and JSON).
        assert_eq!(read.get(), 8 + header_end);
        assert_eq!(f.load_f32("w32").unwrap().data, vec![1.0, -2.0, 0.5, 3.0]);
        assert_eq!(read.get(), 8 + header_end + 16);
        // From disk, the same.
        let path = crate::testutil::fixtures().join("tiny-pixel/unet/diffusion_pytorch_model.safetensors");
        let (disk, memory) = (WeightFile::open(&path).unwrap(), WeightFile::from_bytes("mem", std::fs::read(&path).unwrap()).unwrap());
        let key = "conv_in.weight";
        let whole = memory.load_f32(key).unwrap();
        assert_eq!(disk.load_f32(key).unwrap(), whole);
        // In parts.
        assert_eq!(disk.load_f32_elements(key, 5..77).unwrap(), whole.data[5..77]);
        let n = whole.data.len();
        assert!(disk.load_f32_elements(key, n - 1..n + 1).unwrap_err().to_string().contains("beyond"));
    }

    /// Our parser agrees with the reference implementation on files it writes.
    #[test]
    fn reads_what_the_safetensors_crate_writes() {
        use safetensors::tensor::TensorView;
        let a = f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b: Vec<u8> = [0x3c00u16, 0x4000].iter().flat_map(|b| b.to_le_bytes()).collect();
        let views = [("a", TensorView::new(safetensors::Dtype::F32, vec![2, 3], &a).unwrap()), ("b", TensorView::new(safetensors::Dtype::BF16, vec![2], &b).unwrap())];
        let meta = [("format".to_string(), "pt".to_string())].into();
        let bytes = safetensors::serialize(views, Some(meta)).unwrap();
        let f = WeightFile::from_bytes("ref", bytes).unwrap();
        assert_eq!(f.load_f32("a").unwrap().data, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(f.load_f32("a").unwrap().shape, vec![2, 3]);
        assert_eq!(f.info("b").unwrap().dtype, DType::BF16);
        assert_eq!(f.metadata()["format"], "pt");
    }

    /// Parsing and loading every tensor of arbitrary bytes must end in Ok or Err, never a panic.
    fn load_everything(bytes: Vec<u8>) {
        if let Ok(f) = WeightFile::from_bytes("fuzz", bytes) {
            let keys: Vec<String> = f.keys().map(str::to_owned).collect();
            for key in keys {
                let t = f.load_f32(&key).unwrap();
                assert_eq!(t.data.len(), t.shape.iter().product::<usize>());
            }
            let others: Vec<String> = f.unsupported_tensors().map(|(k, _)| k.to_owned()).collect();
            for key in others {
                assert!(f.load_f32(&key).is_err());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            load_everything(bytes);
        }

        #[test]
        fn random_header_after_a_valid_length(header in proptest::collection::vec(any::<u8>(), 0..128),
                                              data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend(header);
            bytes.extend(data);
            load_everything(bytes);
        }

        #[test]
        fn mutated_valid_files_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = small_file();
            for (at, byte) in edits {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            load_everything(bytes);
        }

        /// Mutations that keep the JSON readable: digits in the header changed to other digits,
        /// so shapes and offsets take arbitrary values.
        #[test]
        fn mutated_numbers_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..10), 1..6),
        ) {
            let mut bytes = small_file();
            let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let digits: Vec<usize> = (8..8 + header_len).filter(|&i| bytes[i].is_ascii_digit()).collect();
            for (at, d) in edits {
                bytes[digits[at.index(digits.len())]] = b'0' + d;
            }
            load_everything(bytes);
        }
    }
}
