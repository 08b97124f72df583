// Runs the engine (Rust compiled to wasm) off the main thread. main.js sends {backend, reason}
// (backend "auto", "webgpu" or "cpu") and renders what comes back:
//   {type: "status", text}  {type: "engine", backend, reason, adapter?, limits?}
//   {type: "result", backend, result, ms}  {type: "error", message}
// Any WebGPU failure ends as an "error"; main.js then starts a fresh worker on the CPU, so a
// crashed wasm instance is never reused.
import init, { Engine } from "../dist/seal_web.js";

const post = (message) => self.postMessage(message);

self.onmessage = async ({ data: { backend, reason } }) => {
  try {
    await init();
    await run(backend, reason);
  } catch (e) {
    post({ type: "error", message: String(e) });
  }
};

async function run(wanted, reason) {
  if (wanted !== "cpu") {
    post({ type: "status", text: "Looking for a WebGPU adapter…" });
    const found = await findAdapter();
    if (found.adapter) {
      const engine = await Engine.webgpu();
      post({
        type: "engine", backend: "webgpu", adapter: found.adapter, limits: JSON.parse(engine.limits()),
        reason: wanted === "webgpu" ? "WebGPU requested (?backend=webgpu)" : "a WebGPU adapter is available",
      });
      return post(await probe(engine));
    }
    reason = found.reason;
  }
  const engine = Engine.cpu();
  post({ type: "engine", backend: "cpu", reason });
  post(await probe(engine));
}

async function probe(engine) {
  post({ type: "status", text: `Running the probe on ${engine.backend()}…` });
  const start = performance.now();
  const result = JSON.parse(await engine.probe());
  return { type: "result", backend: engine.backend(), result, ms: performance.now() - start };
}

// Burn requests its own adapter (high-performance preference, like this one); this one only
// decides whether WebGPU is usable and describes it to the user.
async function findAdapter() {
  if (!navigator.gpu) {
    return { reason: "this browser has no WebGPU (navigator.gpu is missing)" };
  }
  const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
  if (!adapter) {
    return { reason: "WebGPU is present but offers no adapter (disabled or blocklisted GPU)" };
  }
  const info = adapter.info ?? {}; // GPUAdapter.info: Chrome 127+
  const { vendor, architecture, device, description } = info;
  return { adapter: { vendor, architecture, device, description, isFallbackAdapter: info.isFallbackAdapter ?? adapter.isFallbackAdapter } };
}
