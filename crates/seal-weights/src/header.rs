//! The safetensors layout: an 8-byte little-endian header length, a JSON header, then the data.
//!
//! A hostile or damaged header must neither panic nor make us allocate what it claims, so every
//! number in it is checked (with overflow-checked arithmetic) against the bytes actually present
//! before anything is sized from it. Data buffers are only ever sized from checked byte ranges.

use std::collections::BTreeMap;
use std::ops::Range;

use serde_json::{Map, Value};

use crate::{DType, TensorInfo, WeightError};

/// A float tensor: its info and its absolute byte range within the file (u64: a checkpoint
/// may exceed wasm32's 4 GiB address space; only one tensor at a time is ever in memory).
pub(crate) struct Entry {
    pub info: TensorInfo,
    pub range: Range<u64>,
}

/// No real header comes near this (safetensors itself refuses headers over 100 MB); a damaged
/// length field must not make us allocate what it claims.
const MAX_HEADER: u64 = 100_000_000;

/// How many bytes from the start of a file hold its header, given its first 8 bytes and its
/// length: what to read before `parse_head`. Errors as `parse_head` would.
pub(crate) fn head_len(file: &str, first: &[u8], total: u64) -> Result<u64, WeightError> {
    header_len(file, first, total).map(|n| 8 + n)
}

fn header_len(file: &str, first: &[u8], total: u64) -> Result<u64, WeightError> {
    let format = |reason: String| WeightError::Format { file: file.to_owned(), reason };
    let Some(len_bytes) = first.first_chunk::<8>() else {
        return Err(format(format!("{total} bytes is too short for a safetensors header (truncated file?)")));
    };
    let claimed = u64::from_le_bytes(*len_bytes);
    let available = total.saturating_sub(8);
    if claimed > available {
        return Err(format(format!("header length {claimed} exceeds the {available} bytes after it (truncated file?)")));
    }
    if claimed > MAX_HEADER {
        return Err(format(format!("header length {claimed} is larger than any safetensors header")));
    }
    Ok(claimed)
}

/// Parses a whole file held in memory.
#[cfg(test)]
pub(crate) fn parse(file: &str, bytes: &[u8]) -> Result<Header, WeightError> {
    parse_head(file, bytes, bytes.len() as u64)
}

pub(crate) struct Header {
    pub tensors: BTreeMap<String, Entry>,
    /// Well-formed tensors of a dtype we do not convert: key -> dtype name.
    pub unsupported: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
}

/// Parses the header of a file of `total` bytes from `head`, its first bytes (at least
/// `head_len` of them when the file has a valid length field).
pub(crate) fn parse_head(file: &str, head: &[u8], total: u64) -> Result<Header, WeightError> {
    let format = |reason: String| WeightError::Format { file: file.to_owned(), reason };
    let header_len = header_len(file, head, total)? as usize;
    let data_start = 8 + header_len;
    let data_len = total - data_start as u64;
    let json = head.get(8..data_start).ok_or_else(|| format(format!("only {} of the header's {header_len} bytes were read", head.len().saturating_sub(8))))?;
    let json: Map<String, Value> = serde_json::from_slice(json).map_err(|e| format(format!("header is not a JSON object: {e}")))?;

    let mut header = Header { tensors: BTreeMap::new(), unsupported: BTreeMap::new(), metadata: BTreeMap::new() };
    // (start, end, key) of every non-empty tensor, to find overlaps.
    let mut spans = Vec::new();
    for (key, value) in json {
        if key == "__metadata__" {
            header.metadata = parse_metadata(value).ok_or_else(|| format("__metadata__ must map names to strings".into()))?;
            continue;
        }
        let raw = parse_entry(&value, data_len).map_err(|reason| WeightError::Tensor { file: file.to_owned(), tensor: key.clone(), reason })?;
        if !raw.range.is_empty() {
            spans.push((raw.range.start, raw.range.end, key.clone()));
        }
        match raw.dtype {
            Ok(dtype) => {
                let range = data_start as u64 + raw.range.start..data_start as u64 + raw.range.end;
                let info = TensorInfo { dtype, shape: raw.shape };
                header.tensors.insert(key, Entry { info, range });
            }
            Err(name) => {
                header.unsupported.insert(key, name);
            }
        }
    }
    check_overlaps(file, spans)?;
    Ok(header)
}

struct RawEntry {
    /// A dtype we convert, or the name of another valid safetensors dtype.
    dtype: Result<DType, String>,
    shape: Vec<usize>,
    /// Relative to the start of the data section.
    range: Range<u64>,
}

fn parse_entry(value: &Value, data_len: u64) -> Result<RawEntry, String> {
    let obj = value.as_object().ok_or("header entry is not a JSON object")?;
    let name = obj.get("dtype").and_then(Value::as_str).ok_or("\"dtype\" is missing or not a string")?;
    let shape = obj
        .get("shape")
        .and_then(Value::as_array)
        .ok_or("\"shape\" is missing or not an array")?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or("\"shape\" must hold non-negative integers that fit in memory")?;
    let offsets = obj
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| match a.as_slice() {
            [s, e] => Some((s.as_u64()?, e.as_u64()?)),
            _ => None,
        })
        .ok_or("\"data_offsets\" must be [start, end] with non-negative integers")?;

    let (dtype, bits_per_element) = match DType::from_name(name) {
        Some(d) => (Ok(d), d.size() * 8),
        // Other dtypes are kept (they are valid files) but only sized, never converted.
        None => match serde_json::from_value::<safetensors::Dtype>(Value::String(name.into())) {
            Ok(d) => (Err(name.to_owned()), d.bitsize()),
            Err(_) => return Err(format!("unknown dtype {name:?}")),
        },
    };
    let bits = shape.iter().try_fold(bits_per_element, |acc, &d| acc.checked_mul(d)).ok_or_else(|| format!("shape {shape:?} of {name} is too large to address"))?;
    if bits % 8 != 0 {
        return Err(format!("shape {shape:?} of {name} is not a whole number of bytes"));
    }
    let needed = bits / 8;
    let (start, end) = offsets;
    if start > end || end > data_len {
        return Err(format!("data offsets [{start}, {end}] lie outside the {data_len}-byte data section"));
    }
    if end - start != needed as u64 {
        return Err(format!("data offsets [{start}, {end}] hold {} bytes but {name} {shape:?} needs {needed}", end - start));
    }
    let range = start..end;
    Ok(RawEntry { dtype, shape, range })
}

fn parse_metadata(value: Value) -> Option<BTreeMap<String, String>> {
    let Value::Object(map) = value else {
        return None;
    };
    map.into_iter()
        .map(|(k, v)| match v {
            Value::String(s) => Some((k, s)),
            _ => None,
        })
        .collect()
}

/// Gaps between tensors are tolerated (they waste bytes but cannot mislead a load); overlaps
/// are not, since they mean the header is wrong about at least one tensor.
fn check_overlaps(file: &str, mut spans: Vec<(u64, u64, String)>) -> Result<(), WeightError> {
    spans.sort();
    // The span reaching furthest so far: a later span starting before its end overlaps it.
    let mut furthest: Option<&(u64, u64, String)> = None;
    for span in &spans {
        if let Some(prev) = furthest
            && span.0 < prev.1
        {
            return Err(WeightError::Tensor {
                file: file.to_owned(),
                tensor: span.2.clone(),
                reason: format!("data offsets [{}, {}] overlap tensor {} at [{}, {}]", span.0, span.1, prev.2, prev.0, prev.1),
            });
        }
        if furthest.is_none_or(|prev| span.1 > prev.1) {
            furthest = Some(span);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{f32_bytes, raw_file, safetensors_file};

    fn err(bytes: &[u8]) -> String {
        match parse("bad.safetensors", bytes) {
            Ok(_) => panic!("parsed"),
            Err(e) => e.to_string(),
        }
    }

    fn one_tensor(entry: &str, data: &[u8]) -> Vec<u8> {
        raw_file(&format!("{{\"w\":{entry}}}"), data)
    }

    #[test]
    fn parses_a_valid_file() {
        let bytes = safetensors_file(&[("a", "F32", &[2], f32_bytes(&[1.0, 2.0])), ("b", "I64", &[1], vec![0; 8])], Some(r#"{"format":"pt"}"#));
        let h = parse("ok", &bytes).unwrap();
        assert_eq!(h.tensors["a"].info.shape, vec![2]);
        assert_eq!(h.tensors["a"].range.end - h.tensors["a"].range.start, 8);
        assert_eq!(h.unsupported["b"], "I64");
        assert_eq!(h.metadata["format"], "pt");
    }

    #[test]
    fn truncated_files() {
        assert!(err(&[]).contains("bad.safetensors: not a valid safetensors file: 0 bytes"));
        assert!(err(&[1, 0, 0]).contains("too short"));
        let good = safetensors_file(&[("a", "F32", &[4], f32_bytes(&[0.0; 4]))], None);
        // Cut inside the header: the header length now exceeds the file.
        assert!(err(&good[..20]).contains("exceeds"), "{}", err(&good[..20]));
        // Cut inside the data: the tensor's offsets now exceed the data section.
        let e = err(&good[..good.len() - 3]);
        assert!(e.contains("tensor a") && e.contains("outside"), "{e}");
    }

    #[test]
    fn header_length_beyond_the_file() {
        let mut bytes = u64::MAX.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        let e = err(&bytes);
        assert!(e.contains(&format!("header length {}", u64::MAX)), "{e}");
        let mut bytes = 3u64.to_le_bytes().to_vec();
        bytes.extend_from_slice(b"{}");
        assert!(err(&bytes).contains("header length 3 exceeds the 2 bytes"));
    }

    #[test]
    fn invalid_json() {
        for header in ["{\"w\": [", "[1, 2]", "\u{0}", "{\"a\":1,}", "null"] {
            let e = err(&raw_file(header, &[]));
            assert!(e.contains("header is not a JSON object"), "{header:?}: {e}");
        }
        let mut bad_utf8 = raw_file("{\"\u{e9}\":1}", &[]);
        bad_utf8[10] = 0xff; // the first byte of the key's two-byte character
        assert!(err(&bad_utf8).contains("not a JSON object"));
    }

    #[test]
    fn malformed_entries_name_the_tensor() {
        let cases = [
            (r#"3"#, "not a JSON object"),
            (r#"{"shape":[1],"data_offsets":[0,4]}"#, "\"dtype\""),
            (r#"{"dtype":"F32","data_offsets":[0,4]}"#, "\"shape\""),
            (r#"{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}"#, "\"shape\""),
            (r#"{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}"#, "\"shape\""),
            (r#"{"dtype":"F32","shape":[1]}"#, "\"data_offsets\""),
            (r#"{"dtype":"F32","shape":[1],"data_offsets":[0]}"#, "\"data_offsets\""),
            (r#"{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}"#, "\"data_offsets\""),
            (r#"{"dtype":"F33","shape":[1],"data_offsets":[0,4]}"#, "unknown dtype \"F33\""),
        ];
        for (entry, want) in cases {
            let e = err(&one_tensor(entry, &[0; 4]));
            assert!(e.starts_with("bad.safetensors: tensor w: "), "{entry}: {e}");
            assert!(e.contains(want), "{entry}: {e}");
        }
        let e = err(&raw_file(r#"{"__metadata__":{"a":1}}"#, &[]));
        assert!(e.contains("__metadata__"), "{e}");
    }

    #[test]
    fn absurd_sizes_are_rejected_before_allocating() {
        let big = u64::MAX / 2;
        let cases = [
            // Element count overflows.
            (format!(r#"{{"dtype":"F32","shape":[{big},{big}],"data_offsets":[0,4]}}"#), "too large"),
            // Byte count overflows even though the element count does not.
            (format!(r#"{{"dtype":"F32","shape":[{big}],"data_offsets":[0,4]}}"#), "too large"),
            // Plausible shape, far more bytes than the file holds.
            (r#"{"dtype":"F32","shape":[1000000000],"data_offsets":[0,4000000000]}"#.into(), "outside the 4-byte data section"),
            // Offsets out of range or reversed.
            (r#"{"dtype":"F32","shape":[1],"data_offsets":[4,8]}"#.into(), "outside"),
            (format!(r#"{{"dtype":"F32","shape":[1],"data_offsets":[0,{}]}}"#, u64::MAX), "outside"),
            (r#"{"dtype":"F32","shape":[1],"data_offsets":[4,0]}"#.into(), "outside"),
            // Offsets in range but not matching dtype x shape.
            (r#"{"dtype":"F32","shape":[2],"data_offsets":[0,4]}"#.into(), "hold 4 bytes but F32 [2] needs 8"),
            (r#"{"dtype":"F16","shape":[1],"data_offsets":[0,4]}"#.into(), "needs 2"),
            (r#"{"dtype":"I64","shape":[1],"data_offsets":[0,4]}"#.into(), "needs 8"),
            (r#"{"dtype":"F4","shape":[3],"data_offsets":[0,1]}"#.into(), "whole number of bytes"),
        ];
        for (entry, want) in cases {
            let e = err(&one_tensor(&entry, &[0; 4]));
            assert!(e.starts_with("bad.safetensors: tensor w: ") && e.contains(want), "{entry}: {e}");
        }
    }

    #[test]
    fn overlapping_tensors() {
        let header = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},
                        "b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#;
        let e = err(&raw_file(header, &[0; 8]));
        assert!(e.contains("tensor b: data offsets [4, 8] overlap tensor a at [0, 8]"), "{e}");
        // A short span hidden inside a long one is caught even when another span sorts between.
        let header = r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},
                        "b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                        "c":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}"#;
        assert!(err(&raw_file(header, &[0; 16])).contains("overlap"));
        // Empty tensors take no bytes and overlap nothing.
        let header = r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},
                        "e":{"dtype":"F32","shape":[0],"data_offsets":[2,2]}}"#;
        assert!(parse("ok", &raw_file(header, &[0; 4])).is_ok());
    }
}
