//! Images between tensors, pixels and PNG files: one implementation for the CLI's files, the
//! page's canvases and the evaluation's detectors.

use burn::tensor::Tensor;

/// An RGB image with channels in [0, 1], row-major `[h][w][3]` — the detectors' layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb {
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Rgb {
    /// Splits a batch `[B, 3, H, W]` of [0, 1] images (as `StableDiffusion::decode` returns).
    pub async fn from_batch(images: Tensor<4>) -> Result<Vec<Rgb>, String> {
        let [b, c, h, w] = images.dims();
        if c != 3 {
            return Err(format!("expected 3 channels, got {c}"));
        }
        let data = seal_sd::read_back(images.permute([0, 2, 3, 1])).await?;
        Ok(data.chunks_exact(h * w * 3).take(b).map(|d| Rgb { width: w, height: h, data: d.to_vec() }).collect())
    }

    /// The inverse of `from_batch`: images of one size as a batch `[B, 3, H, W]` in [0, 1].
    pub fn to_batch(images: &[Rgb], device: &burn::tensor::Device) -> Tensor<4> {
        let (w, h) = (images[0].width, images[0].height);
        let data: Vec<f32> = images.iter().flat_map(|i| i.data.iter().copied()).collect();
        Tensor::<4>::from_data(burn::tensor::TensorData::new(data, [images.len(), h, w, 3]), device).permute([0, 3, 1, 2])
    }

    /// 8-bit rounding exactly as diffusers' `numpy_to_pil`: `(x * 255).round()`.
    pub fn to_rgb8(&self) -> Vec<u8> {
        self.data.iter().map(|&x| (x.clamp(0.0, 1.0) * 255.0).round() as u8).collect()
    }

    pub fn from_rgb8(width: usize, height: usize, pixels: &[u8]) -> Self {
        Self { width, height, data: pixels.iter().map(|&p| p as f32 / 255.0).collect() }
    }

    pub fn pixel(&self, x: usize, y: usize) -> [f32; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }

    pub fn to_png(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        let mut writer = encoder.write_header().expect("writing to a Vec cannot fail");
        writer.write_image_data(&self.to_rgb8()).expect("sizes match");
        writer.finish().expect("writing to a Vec cannot fail");
        out
    }

    /// Decodes an 8-bit PNG (RGB, RGBA, gray or gray-alpha); `name` labels errors.
    pub fn from_png(name: &str, bytes: &[u8]) -> Result<Self, String> {
        let mut decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
        let mut reader = decoder.read_info().map_err(|e| format!("{name}: not a readable PNG: {e}"))?;
        let mut buf = vec![0; reader.output_buffer_size().ok_or_else(|| format!("{name}: image too large"))?];
        let info = reader.next_frame(&mut buf).map_err(|e| format!("{name}: {e}"))?;
        let (w, h) = (info.width as usize, info.height as usize);
        let px = &buf[..info.buffer_size()];
        let rgb: Vec<u8> = match info.color_type {
            png::ColorType::Rgb => px.to_vec(),
            png::ColorType::Rgba => px.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect(),
            png::ColorType::Grayscale => px.iter().flat_map(|&g| [g, g, g]).collect(),
            png::ColorType::GrayscaleAlpha => px.chunks_exact(2).flat_map(|p| [p[0], p[0], p[0]]).collect(),
            png::ColorType::Indexed => return Err(format!("{name}: indexed PNG was not expanded")),
        };
        Ok(Self::from_rgb8(w, h, &rgb))
    }

    /// Nearest-neighbour enlargement by an integer factor.
    pub fn upscale(&self, k: usize) -> Rgb {
        let k = k.max(1);
        let (w, h) = (self.width * k, self.height * k);
        let data = (0..h).flat_map(|y| (0..w).flat_map(move |x| self.pixel(x / k, y / k))).collect();
        Rgb { width: w, height: h, data }
    }

    /// Tiles equally sized images into `cols` columns with a `gap`-pixel white border.
    pub fn grid(images: &[Rgb], cols: usize, gap: usize) -> Rgb {
        let (w, h) = images.first().map_or((0, 0), |i| (i.width, i.height));
        let cols = cols.max(1).min(images.len().max(1));
        let rows = images.len().div_ceil(cols);
        let (gw, gh) = (cols * (w + gap) + gap, rows * (h + gap) + gap);
        let mut data = vec![1.0; gw * gh * 3];
        for (n, img) in images.iter().enumerate() {
            let (x0, y0) = (gap + (n % cols) * (w + gap), gap + (n / cols) * (h + gap));
            for y in 0..h {
                let src = &img.data[y * w * 3..(y + 1) * w * 3];
                let dst = ((y0 + y) * gw + x0) * 3;
                data[dst..dst + w * 3].copy_from_slice(src);
            }
        }
        Rgb { width: gw, height: gh, data }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn png_round_trip_and_grid() {
        let a = Rgb::from_rgb8(2, 1, &[255, 0, 0, 0, 128, 255]);
        let back = Rgb::from_png("a.png", &a.to_png()).unwrap();
        assert_eq!(back, a);
        let g = Rgb::grid(&[a.clone(), a.clone(), a], 2, 1);
        assert_eq!((g.width, g.height), (7, 5));
        assert_eq!(g.pixel(1, 1), [1.0, 0.0, 0.0]);
        assert_eq!(g.pixel(4, 1), [1.0, 0.0, 0.0]);
        assert_eq!(g.pixel(1, 3), [1.0, 0.0, 0.0]);
        assert_eq!(g.pixel(0, 0), [1.0, 1.0, 1.0]);
        assert!(Rgb::from_png("junk.png", b"not a png").unwrap_err().contains("junk.png"));
    }

    #[test]
    fn reads_the_fixture_patch() {
        let dir = crate::fixtures().join("patch.png");
        let patch = Rgb::from_png("patch.png", &std::fs::read(dir).unwrap()).unwrap();
        assert_eq!((patch.width, patch.height), (8, 8));
        // 2x2-pixel checkerboard cells, white at (0, 0).
        assert_eq!(patch.pixel(0, 0), [1.0; 3]);
        assert_eq!(patch.pixel(2, 0), [0.0; 3]);
        assert_eq!(patch.pixel(2, 2), [1.0; 3]);
    }
}
