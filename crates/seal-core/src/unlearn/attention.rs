//! Cross-attention guidance: the UNet's cross-attention maps summed at one resolution,
//! min-max normalised per token, compared row by row (with gradient).

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Int, Tensor, TensorData};

/// The side of the common resolution: the largest map side, at most 16 (SD at 512 px has
/// 64, 32, 16 and 8; finer maps cost memory and say little more about where a token goes).
pub fn resolution(maps: &[Tensor<4>]) -> usize {
    maps.iter().map(|m| m.dims()[1]).max().unwrap_or(1).min(16)
}

/// Head-averaged maps `[B, h, w, T]` of every layer -> their sum at `res x res`, `[B, T, res²]`.
pub fn aggregate(maps: &[Tensor<4>], res: usize) -> Tensor<3> {
    let mut sum: Option<Tensor<4>> = None;
    for m in maps {
        let m = m.clone().permute([0, 3, 1, 2]);
        let m = if m.dims()[2] == res && m.dims()[3] == res { m } else { interpolate(m, InterpolateOptions::new(InterpolateMode::Bilinear).with_output_size([res, res])) };
        sum = Some(match sum {
            Some(s) => s + m,
            None => m,
        });
    }
    let sum = sum.expect("at least one cross-attention layer");
    let [b, t, _, _] = sum.dims();
    sum.reshape([b, t, res * res])
}

/// Rows `positions` of one sample's `[T, P]` maps, each min-max normalised to [0, 1].
pub fn rows(maps: &Tensor<3>, sample: usize, positions: &[usize]) -> Tensor<2> {
    let [_, t, p] = maps.dims();
    let idx: Vec<i64> = positions.iter().map(|&i| i as i64).collect();
    let idx = Tensor::<1, Int>::from_data(TensorData::new(idx, [positions.len()]), &maps.device());
    let x = maps.clone().narrow(0, sample, 1).reshape([t, p]).select(0, idx);
    let min = x.clone().min_dim(1);
    let max = x.clone().max_dim(1);
    (x - min.clone()) / (max - min + 1e-6)
}

#[cfg(test)]
mod tests {
    use burn::tensor::Device;

    use super::*;

    #[test]
    fn aggregate_resizes_and_rows_normalise() {
        let d = Device::flex();
        let a = Tensor::<4>::ones([1, 4, 4, 3], &d);
        let b = Tensor::<4>::ones([1, 2, 2, 3], &d) * 2.0;
        let s = aggregate(&[a, b], 4);
        assert_eq!(s.dims(), [1, 3, 16]);
        let v: Vec<f32> = s.clone().into_data().try_to_vec().unwrap();
        assert!(v.iter().all(|x| (x - 3.0).abs() < 1e-5));
        let ramp = Tensor::<3>::from_data(TensorData::new((0..8).map(|x| x as f32).collect::<Vec<_>>(), [1, 2, 4]), &d);
        let r: Vec<f32> = rows(&ramp, 0, &[1]).into_data().try_to_vec().unwrap();
        assert!((r[0]).abs() < 1e-5 && (r[3] - 1.0).abs() < 1e-5);
    }
}
