//! Builds safetensors bytes for tests, including deliberately malformed ones.

/// Header length + header + data, with the header taken as given.
pub(crate) fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    bytes
}

/// A well-formed file: tensors (name, dtype, shape, bytes) laid out back to back.
pub(crate) fn safetensors_file(tensors: &[(&str, &str, &[usize], Vec<u8>)], metadata: Option<&str>) -> Vec<u8> {
    let mut entries: Vec<String> = metadata.map(|m| format!("\"__metadata__\":{m}")).into_iter().collect();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        entries.push(format!("\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":{shape:?},\"data_offsets\":[{start},{}]}}", data.len()));
    }
    raw_file(&format!("{{{}}}", entries.join(",")), &data)
}

pub(crate) fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

pub(crate) use crate::test_fixtures as fixtures;

/// Tensor names and shapes of a layout file (made by diffusers/transformers) in the fixtures.
pub fn layout(file: &str) -> std::collections::BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixtures().join("layouts").join(file)).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    serde_json::from_value(json["tensors"].clone()).unwrap()
}
