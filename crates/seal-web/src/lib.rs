//! The wasm-bindgen surface the page's worker calls. Thin: computation lives in seal-core.

mod blob;
mod session;

use burn::prelude::Device;
use wasm_bindgen::prelude::*;

pub use session::Session;

#[wasm_bindgen(start)]
fn start() {
    console_error_panic_hook::set_once();
}

/// The page's compute device, created once and reused (WebGPU may be initialised only once per page).
#[wasm_bindgen]
pub struct Engine {
    device: Device,
    backend: String,
    limits: Option<String>,
    /// The largest buffer a shader may bind (WebGPU's maxStorageBufferBindingSize).
    max_buffer: Option<u64>,
}

#[wasm_bindgen]
impl Engine {
    /// Burn's pure-Rust CPU backend (flex): always available.
    pub fn cpu() -> Engine {
        Engine { device: Device::flex(), backend: "cpu".into(), limits: None, max_buffer: None }
    }

    /// Burn's wgpu backend on the browser's WebGPU.
    ///
    /// No limits to pass: cubecl-wgpu 0.11.3 (`backend/wgsl.rs`, `try_request_device`) already
    /// requests the device with `required_limits: adapter.limits()`, i.e. the adapter's real
    /// limits rather than WebGPU's 128 MiB binding / 256 MiB buffer defaults. `limits()` reports
    /// what the created device actually got, next to what the adapter offers.
    #[cfg(target_family = "wasm")]
    pub async fn webgpu() -> Result<Engine, String> {
        let (device, setup) = Device::wgpu_options().init_with_setup_async().await.map_err(|e| e.to_string())?;
        let limits = serde_json::json!({
            "device": limits_json(&setup.device.limits()),
            "adapter": limits_json(&setup.adapter.limits()),
        });
        let max_buffer = Some(setup.device.limits().max_storage_buffer_binding_size);
        Ok(Engine { device, backend: "webgpu".into(), limits: Some(limits.to_string()), max_buffer })
    }

    /// `"webgpu"` or `"cpu"`.
    pub fn backend(&self) -> String {
        self.backend.clone()
    }

    /// JSON `{device: {...}, adapter: {...}}` of the main WebGPU limits; none on the CPU.
    pub fn limits(&self) -> Option<String> {
        self.limits.clone()
    }

    /// Runs seal-core's autodiff probe on this device; resolves to its JSON result.
    pub async fn probe(&self) -> Result<String, String> {
        let result = seal_core::probe::autodiff_probe(&self.device).await?;
        serde_json::to_string(&result).map_err(|e| e.to_string())
    }
}

#[cfg(target_family = "wasm")]
fn limits_json(l: &burn::tensor::wgpu::wgpu::Limits) -> serde_json::Value {
    serde_json::json!({
        "maxBufferSize": l.max_buffer_size,
        "maxStorageBufferBindingSize": l.max_storage_buffer_binding_size,
        "maxStorageBuffersPerShaderStage": l.max_storage_buffers_per_shader_stage,
        "maxComputeWorkgroupStorageSize": l.max_compute_workgroup_storage_size,
        "maxComputeInvocationsPerWorkgroup": l.max_compute_invocations_per_workgroup,
        "maxComputeWorkgroupsPerDimension": l.max_compute_workgroups_per_dimension,
    })
}
