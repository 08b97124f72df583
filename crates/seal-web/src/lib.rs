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
    /// The device computes in f16 (the CPU engine, or WebGPU with `shader-f16`; its f16
    /// self-check passed), so f16 models stay f16 on it.
    half: bool,
    /// What the page says about it.
    precision: String,
}

#[wasm_bindgen]
impl Engine {
    /// Burn's pure-Rust CPU backend (flex): always available. It computes in f16 too, which
    /// halves what an f16 model takes of wasm32's 4 GiB (SD 1.5 fits whole only so); f16 is
    /// used once it computes what f32 does, as on WebGPU.
    pub async fn cpu() -> Engine {
        let device = Device::flex();
        let (half, precision) = half_precision(&device, "the CPU engine computes in f16").await;
        Engine { device, backend: "cpu".into(), limits: None, max_buffer: None, half, precision }
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
        // cubecl-wgpu requests every feature the adapter has, and enables f16 in its kernels
        // when `shader-f16` is among them; f16 is used once it computes what f32 does.
        let offered = setup.device.features().contains(burn::tensor::wgpu::wgpu::Features::SHADER_F16);
        let (half, precision) = match offered {
            false => (false, "weights widened to f32 (this GPU offers no shader-f16)".to_string()),
            true => half_precision(&device, "this GPU offers shader-f16").await,
        };
        Ok(Engine { device, backend: "webgpu".into(), limits: Some(limits.to_string()), max_buffer, half, precision })
    }

    /// How this engine keeps a model's weights, for the page to say.
    pub fn precision(&self) -> String {
        self.precision.clone()
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

/// Whether `device` keeps f16 models in f16 (its f16 self-check passes; `why` says what it
/// offers), and the page's line about it.
async fn half_precision(device: &Device, why: &str) -> (bool, String) {
    match seal_core::probe::half_probe(device).await {
        Ok(e) if e <= seal_core::probe::HALF_PROBE_TOLERANCE => (true, format!("weights of f16 models kept in f16 ({why}, self-check within {e:.1e})")),
        Ok(e) => (false, format!("weights widened to f32 ({why}, but its self-check was off by {e:.1e})")),
        Err(e) => (false, format!("weights widened to f32 ({why}, but its self-check failed: {e})")),
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
