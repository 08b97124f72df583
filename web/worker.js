// Runs the engine (Rust compiled to wasm) off the main thread. The page tells it which backend
// to use ("auto", "webgpu" or "cpu"); it answers with messages that main.js renders:
//   {type: "status", text}  {type: "engine", backend, reason, adapter?, limits?}
//   {type: "result", backend, result, ms}  {type: "error", message}
import init, { Engine } from "../dist/seal_web.js";

const post = (message) => self.postMessage(message);

self.onmessage = async ({ data: { backend } }) => {
  try {
    await init();
    await run(backend);
  } catch (e) {
    post({ type: "error", message: String(e) });
  }
};

async function run(wanted) {
  let engine = null;
  let reason = "CPU requested (?backend=cpu)";
  if (wanted !== "cpu") {
    post({ type: "status", text: "Looking for a WebGPU adapter…" });
    const found = await findAdapter();
    reason = found.reason;
    if (found.adapter) {
      try {
        engine = await Engine.webgpu();
        reason = wanted === "webgpu" ? "WebGPU requested (?backend=webgpu)" : "a WebGPU adapter is available";
        post({ type: "engine", backend: "webgpu", reason, adapter: found.adapter,
               limits: JSON.parse(engine.limits()) });
      } catch (e) {
        reason = `WebGPU initialisation failed: ${e}`;
      }
    }
  }
  if (engine) {
    try {
      return post(await probe(engine));
    } catch (e) {
      reason = `the computation failed on WebGPU: ${e}`;
    }
  }
  engine = Engine.cpu();
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
  const { vendor, architecture, device, description } = adapter.info;
  const isFallbackAdapter = adapter.info.isFallbackAdapter ?? adapter.isFallbackAdapter;
  return { adapter: { vendor, architecture, device, description, isFallbackAdapter } };
}
