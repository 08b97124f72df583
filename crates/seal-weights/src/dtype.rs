use std::fmt;

/// An element type that loads as f32. Files may hold other safetensors dtypes (int64 position
/// ids, for instance); those are listed by [`crate::WeightFile::unsupported_tensors`] and fail to
/// load with an error naming the file, the tensor and the dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    /// Little-endian bytes, rounding to nearest; None if a value is not finite after conversion.
    pub fn encode(self, data: &[f32]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(data.len() * self.size());
        for &v in data {
            let finite = match self {
                DType::F32 => {
                    out.extend_from_slice(&v.to_le_bytes());
                    v.is_finite()
                }
                DType::F16 => {
                    let h = half::f16::from_f32(v);
                    out.extend_from_slice(&h.to_le_bytes());
                    h.is_finite()
                }
                DType::BF16 => {
                    let h = half::bf16::from_f32(v);
                    out.extend_from_slice(&h.to_le_bytes());
                    h.is_finite()
                }
            };
            if !finite {
                return None;
            }
        }
        Some(out)
    }

    /// The dtype's name in a safetensors header.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [DType::F32, DType::F16, DType::BF16].into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Little-endian element bytes -> f32. Exact: every f16 and bf16 value is an f32 value.
    /// `bytes.len()` is a multiple of [`DType::size`] (the header check guarantees it).
    /// Appends the values of `bytes` (whole elements) to `out`.
    pub(crate) fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) {
        match self {
            DType::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
            DType::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())),
            DType::BF16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode16(dtype: DType, bits: u16) -> f32 {
        let mut out = vec![];
        dtype.decode_into(&bits.to_le_bytes(), &mut out);
        out[0]
    }

    /// IEEE half precision by its definition, independent of the `half` crate.
    fn f16_reference(bits: u16) -> f32 {
        let sign = if bits & 0x8000 != 0 { -1.0f64 } else { 1.0 };
        let exp = i32::from((bits >> 10) & 0x1f);
        let frac = f64::from(bits & 0x3ff);
        let magnitude = match exp {
            0 => frac * 2f64.powi(-24),
            31 if frac == 0.0 => f64::INFINITY,
            31 => f64::NAN,
            _ => (1.0 + frac / 1024.0) * 2f64.powi(exp - 15),
        };
        (sign * magnitude) as f32
    }

    #[test]
    fn f16_known_bit_patterns() {
        let cases: [(u16, f32); 10] = [
            (0x0000, 0.0),
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x3555, 0.333_251_95),
            (0x7bff, 65504.0),
            (0x0400, 2f32.powi(-14)),          // smallest normal
            (0x0001, 2f32.powi(-24)),          // smallest subnormal
            (0x03ff, 1023.0 * 2f32.powi(-24)), // largest subnormal
            (0x7c00, f32::INFINITY),
            (0xfc00, f32::NEG_INFINITY),
        ];
        for (bits, want) in cases {
            assert_eq!(decode16(DType::F16, bits).to_bits(), want.to_bits(), "{bits:#06x}");
        }
        assert_eq!(decode16(DType::F16, 0x8000).to_bits(), (-0.0f32).to_bits());
        assert!(decode16(DType::F16, 0x7e00).is_nan());
    }

    #[test]
    fn f16_every_bit_pattern_matches_the_definition() {
        for bits in 0..=u16::MAX {
            let (got, want) = (decode16(DType::F16, bits), f16_reference(bits));
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_is_the_top_half_of_an_f32() {
        let cases: [(u16, f32); 6] = [
            (0x3f80, 1.0),
            (0xc040, -3.0),
            (0x4049, 3.140_625),
            (0x7f7f, (2.0 - 2f32.powi(-7)) * 2f32.powi(127)), // largest finite
            (0x0001, 2f32.powi(-133)),                        // smallest subnormal
            (0xff80, f32::NEG_INFINITY),
        ];
        for (bits, want) in cases {
            assert_eq!(decode16(DType::BF16, bits).to_bits(), want.to_bits(), "{bits:#06x}");
        }
        for bits in 0..=u16::MAX {
            let want = f32::from_bits(u32::from(bits) << 16);
            let got = decode16(DType::BF16, bits);
            assert!(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()));
        }
    }

    #[test]
    fn f32_is_little_endian() {
        let bytes = [1.5f32.to_le_bytes(), (-0.25f32).to_le_bytes()].concat();
        let mut out = vec![9.0];
        DType::F32.decode_into(&bytes, &mut out);
        assert_eq!(out, vec![9.0, 1.5, -0.25], "appended");
    }

    #[test]
    fn names_round_trip() {
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(DType::from_name(d.name()), Some(d));
        }
        assert_eq!(DType::from_name("F64"), None);
    }
}
