//! A browser `Blob` (a `File` the user picked or dropped) as a `ByteSource`: the engine reads
//! the safetensors header, then each tensor's byte range as it loads it, so a checkpoint of
//! gigabytes is never copied whole into wasm memory.

use std::ops::Range;

use seal_sd::seal_weights::ByteSource;
use wasm_bindgen::{JsCast, JsValue};
use web_sys::{Blob, FileReaderSync};

pub struct BlobSource {
    blob: Blob,
    /// `FileReaderSync` exists only in workers: the engine runs in one.
    reader: FileReaderSync,
}

impl BlobSource {
    pub fn new(blob: Blob) -> Result<Self, String> {
        let reader = FileReaderSync::new().map_err(|e| format!("this browser cannot read files from a worker ({})", describe(&e)))?;
        Ok(Self { blob, reader })
    }
}

impl ByteSource for BlobSource {
    fn len(&self) -> u64 {
        self.blob.size() as u64
    }

    fn read(&self, range: Range<u64>) -> Result<Vec<u8>, String> {
        let slice = self.blob.slice_with_f64_and_f64(range.start as f64, range.end as f64).map_err(|e| describe(&e))?;
        let buffer = self.reader.read_as_array_buffer(&slice).map_err(|e| format!("the file could not be read ({}); was it changed or removed?", describe(&e)))?;
        let bytes = js_sys::Uint8Array::new(&buffer).to_vec();
        if bytes.len() as u64 != range.end - range.start {
            return Err(format!("{} of {} bytes read at offset {}", bytes.len(), range.end - range.start, range.start));
        }
        Ok(bytes)
    }
}

fn describe(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).or_else(|| e.as_string()).unwrap_or_else(|| format!("{e:?}"))
}
