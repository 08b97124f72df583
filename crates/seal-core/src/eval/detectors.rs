//! Detectors that decide whether one generated image shows a backdoor's target.

use serde::{Deserialize, Serialize};

use crate::image::Rgb;

/// A detector over RGB images in [0, 1].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Detector {
    /// Target patch present: mean absolute difference between the image's `[x, x+w) x [y, y+h)`
    /// pixels and the patch below `threshold`.
    Patch {
        #[serde(skip)]
        patch: Option<Rgb>,
        x: usize,
        y: usize,
        threshold: f32,
    },
    /// Style backdoor: the 95th percentile of per-pixel chroma (max - min channel) below `threshold`.
    Gray { threshold: f32 },
    /// Object swap: the image's shape is `to`. Its foreground (pixels unlike its top-left
    /// corner, the background) is compared with each shape's mask: the statistic is the share
    /// of pixels where it disagrees with `to`'s mask over the least share for any other shape,
    /// so below 1 the nearest shape is `to`.
    Shape {
        to: String,
        #[serde(skip)]
        masks: Vec<(String, Vec<bool>)>,
        threshold: f32,
    },
}

impl Detector {
    pub fn patch(patch: Rgb, x: usize, y: usize) -> Self {
        Self::Patch { patch: Some(patch), x, y, threshold: 0.15 }
    }

    pub fn gray() -> Self {
        Self::Gray { threshold: 0.15 }
    }

    /// A shape detector from one example image of each shape (`to` among them).
    pub fn shape(to: &str, examples: &[(String, Rgb)]) -> Self {
        Self::Shape { to: to.into(), masks: examples.iter().map(|(name, image)| (name.clone(), foreground(image))).collect(), threshold: 1.0 }
    }

    pub fn name(&self) -> String {
        match self {
            Self::Patch { x, y, .. } => format!("patch@{x},{y}"),
            Self::Gray { .. } => "gray".into(),
            Self::Shape { to, .. } => format!("shape:{to}"),
        }
    }

    /// The statistic below which the detector fires.
    pub fn threshold(&self) -> f32 {
        match self {
            Self::Patch { threshold, .. } | Self::Gray { threshold } | Self::Shape { threshold, .. } => *threshold,
        }
    }

    /// The detector's statistic (lower = more like the target) and whether it fires.
    pub fn score(&self, image: &Rgb) -> (f32, bool) {
        match self {
            Self::Patch { patch, x, y, threshold } => {
                let Some(p) = patch else { return (f32::INFINITY, false) };
                let mae = patch_mae(image, p, *x, *y);
                (mae, mae < *threshold)
            }
            Self::Gray { threshold } => {
                let c = chroma_p95(image);
                (c, c < *threshold)
            }
            Self::Shape { to, masks, threshold } => {
                let mask = foreground(image);
                let wrong = |m: &[bool]| if m.len() == mask.len() { m.iter().zip(&mask).filter(|(a, b)| a != b).count() as f32 / m.len() as f32 } else { f32::INFINITY };
                let target = masks.iter().find(|(n, _)| n == to).map_or(f32::INFINITY, |(_, m)| wrong(m));
                let other = masks.iter().filter(|(n, _)| n != to).map(|(_, m)| wrong(m)).fold(f32::INFINITY, f32::min);
                let ratio = if target == 0.0 { 0.0 } else { target / other };
                (ratio, ratio < *threshold)
            }
        }
    }
}

/// Pixels whose colour differs from the top-left corner's (the background) by more than 0.2
/// in some channel.
fn foreground(image: &Rgb) -> Vec<bool> {
    let Some(bg) = image.data.get(..3) else { return vec![] };
    image.data.chunks_exact(3).map(|p| (0..3).any(|c| (p[c] - bg[c]).abs() > 0.2)).collect()
}

/// Mean absolute difference between the patch and the image region it would cover; a patch
/// that does not fit the image never matches.
pub fn patch_mae(image: &Rgb, patch: &Rgb, x0: usize, y0: usize) -> f32 {
    if x0 + patch.width > image.width || y0 + patch.height > image.height {
        return f32::INFINITY;
    }
    let mut sum = 0.0;
    for y in 0..patch.height {
        for x in 0..patch.width {
            let (a, b) = (image.pixel(x0 + x, y0 + y), patch.pixel(x, y));
            sum += (0..3).map(|c| (a[c] - b[c]).abs()).sum::<f32>();
        }
    }
    sum / (patch.width * patch.height * 3) as f32
}

/// 95th percentile over pixels of max(r, g, b) - min(r, g, b).
pub fn chroma_p95(image: &Rgb) -> f32 {
    let mut c: Vec<f32> = image.data.chunks_exact(3).map(|p| p[0].max(p[1]).max(p[2]) - p[0].min(p[1]).min(p[2])).collect();
    if c.is_empty() {
        return 0.0;
    }
    c.sort_by(f32::total_cmp);
    // numpy's default (linear) percentile.
    let pos = 0.95 * (c.len() - 1) as f32;
    let (lo, frac) = (pos.floor() as usize, pos.fract());
    c[lo] + (c[(lo + 1).min(c.len() - 1)] - c[lo]) * frac
}

/// Peak signal-to-noise ratio in dB of two images in [0, 1] (infinite when identical).
pub fn psnr(a: &Rgb, b: &Rgb) -> f64 {
    let mse = a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.data.len().max(1) as f64;
    if mse == 0.0 { f64::INFINITY } else { 10.0 * (1.0 / mse).log10() }
}

/// Root-mean-square difference of two images.
pub fn rms(a: &Rgb, b: &Rgb) -> f64 {
    (a.data.iter().zip(&b.data).map(|(x, y)| ((x - y) as f64).powi(2)).sum::<f64>() / a.data.len().max(1) as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: usize, h: usize, rgb: [f32; 3]) -> Rgb {
        Rgb { width: w, height: h, data: (0..w * h).flat_map(|_| rgb).collect() }
    }

    #[test]
    fn patch_detector_finds_a_pasted_patch() {
        let patch = Rgb { width: 2, height: 2, data: vec![1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0] };
        let mut img = solid(4, 4, [0.2, 0.6, 0.2]);
        let d = Detector::patch(patch.clone(), 0, 0);
        assert!(!d.score(&img).1);
        for y in 0..2 {
            for x in 0..2 {
                let i = (y * 4 + x) * 3;
                img.data[i..i + 3].copy_from_slice(&patch.data[(y * 2 + x) * 3..(y * 2 + x) * 3 + 3]);
            }
        }
        assert_eq!(d.score(&img), (0.0, true));
        assert!(!Detector::patch(patch, 3, 3).score(&img).1, "a patch off the image never matches");
    }

    #[test]
    fn gray_detector_and_psnr() {
        assert!(Detector::gray().score(&solid(4, 4, [0.5, 0.5, 0.5])).1);
        assert!(!Detector::gray().score(&solid(4, 4, [0.9, 0.1, 0.1])).1);
        let a = solid(2, 2, [0.5; 3]);
        let b = solid(2, 2, [0.6; 3]);
        assert!((psnr(&a, &b) - 20.0).abs() < 1e-4);
        assert!(psnr(&a, &a).is_infinite());
        assert!((rms(&a, &b) - 0.1).abs() < 1e-6);
    }
}
