//! Fixtures and comparisons shared by this crate's tests.

use burn::tensor::{Device, Tensor, TensorData};
use seal_weights::WeightFile;

use crate::pipeline::{ModelSource, StableDiffusion};

pub use seal_weights::test_fixtures as fixtures;

pub fn device() -> Device {
    Device::flex()
}

pub fn golden() -> WeightFile {
    WeightFile::open(&fixtures().join("golden/clean_parity.safetensors")).expect("golden vectors")
}

pub fn tensor<const D: usize>(file: &WeightFile, key: &str) -> Tensor<D> {
    let t = file.load_f32(key).unwrap_or_else(|e| panic!("{key}: {e}"));
    Tensor::from_data(TensorData::new(t.data, t.shape), &device())
}

pub fn tiny_clean() -> StableDiffusion {
    StableDiffusion::load(ModelSource::from_path(&fixtures().join("tiny-clean")).unwrap(), &device()).unwrap()
}

/// Max absolute error relative to the reference's largest magnitude; asserts it is <= `tol`.
pub fn assert_close<const D: usize>(actual: Tensor<D>, expected: Tensor<D>, tol: f64, what: &str) -> f64 {
    assert_eq!(actual.dims(), expected.dims(), "{what}: shape");
    let a: Vec<f32> = actual.into_data().try_to_vec::<f32>().unwrap();
    let e: Vec<f32> = expected.into_data().try_to_vec::<f32>().unwrap();
    let scale = e.iter().fold(0f64, |m, x| m.max(x.abs() as f64)).max(1e-12);
    let err = a.iter().zip(&e).fold(0f64, |m, (x, y)| m.max((*x as f64 - *y as f64).abs()));
    let rel = err / scale;
    eprintln!("{what}: max abs err {err:.3e}, relative {rel:.3e}");
    assert!(rel <= tol, "{what}: relative error {rel:.3e} > {tol:.0e} (max abs {err:.3e})");
    rel
}

/// An integer tensor of the golden file (token ids, timesteps), widened to i64.
pub fn golden_ints(key: &str) -> Vec<i64> {
    let bytes = std::fs::read(fixtures().join("golden/clean_parity.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(key).unwrap();
    assert_eq!(view.dtype(), safetensors::Dtype::I64, "{key}");
    view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
}

/// The golden timesteps as a float tensor, as the UNet takes them.
pub fn golden_timesteps(key: &str) -> Tensor<1> {
    let t: Vec<f32> = golden_ints(key).into_iter().map(|t| t as f32).collect();
    Tensor::from_floats(t.as_slice(), &device())
}

/// The files of a fixture model folder, as the page would hand them over.
pub fn fixture_files(name: &str) -> crate::pipeline::Files {
    crate::pipeline::read_folder(&fixtures().join(name), true).unwrap()
}

/// Rewrites a safetensors file tensor by tensor: `f(name, shape, f32 data)` returns the new
/// (name, shape, data) or `None` to drop the tensor; `half` stores the result as f16.
pub fn rewrite_safetensors(bytes: &[u8], half: bool, mut f: impl FnMut(&str, Vec<usize>, Vec<f32>) -> Option<(String, Vec<usize>, Vec<f32>)>) -> Vec<u8> {
    let file = WeightFile::from_bytes("in-memory", bytes.to_vec()).unwrap();
    let mut out: Vec<(String, Vec<usize>, Vec<u8>)> = vec![];
    for key in file.keys().map(str::to_string).collect::<Vec<_>>() {
        let t = file.load_f32(&key).unwrap();
        if let Some((name, shape, data)) = f(&key, t.shape, t.data) {
            let raw = if half { data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect() } else { data.iter().flat_map(|x| x.to_le_bytes()).collect() };
            out.push((name, shape, raw));
        }
    }
    let dtype = if half { safetensors::Dtype::F16 } else { safetensors::Dtype::F32 };
    let views: Vec<(String, safetensors::tensor::TensorView)> =
        out.iter().map(|(n, s, d)| (n.clone(), safetensors::tensor::TensorView::new(dtype, s.clone(), d).unwrap())).collect();
    safetensors::serialize(views, None).unwrap()
}
