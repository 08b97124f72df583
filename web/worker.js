// Runs the engine (Rust compiled to wasm) off the main thread, so the page never freezes.
// main.js first sends {type: "start", backend, reason} (backend "auto", "webgpu" or "cpu"):
//   -> {type: "status", text}  {type: "engine", backend, reason, adapter?, limits?}
//      {type: "result", backend, result, ms} (the self-check)  {type: "ready", fields, builtin}
//      {type: "error", message} (start failed; main.js retries on the CPU with a fresh worker)
// then {type: "call", id, method, args}: one of the wasm `Session`'s methods listed below,
// answered by {type: "reply", id, value} or {type: "reply", id, error, fatal}. Values cross as
// plain JS objects (serde-wasm-bindgen), bytes as Uint8Array.
// Calls run one at a time, in order. An error the Rust code returns is a string; anything else
// (a panic, running out of memory, a lost GPU device) is fatal: this wasm instance is not to be
// trusted again, and main.js starts a fresh worker.
import init, { Engine, Session } from "../dist/seal_web.js";

const post = (message, transfer = []) => self.postMessage(message, transfer);

// What main.js may call: the class's own functions and a session's methods, nothing else.
const STATIC = new Set(["files_to_read", "parse_prompts"]);
const METHODS = new Set([
  "stage_file", "load_model", "load_lora", "set_lora_weight", "clear_lora", "describe_trigger",
  "step_memory", "start_seal", "seal_step", "finish_seal", "set_target", "clear_target",
  "start_eval", "eval_step", "grid_png", "heatmaps", "heatmap_png",
  "start_scan", "scan_step", "scan_report", "scan_images_png",
  "adapter_file", "sealed_lora_file", "report",
]);
let wasm;
let session;
let queue = Promise.resolve();

self.onmessage = ({ data }) => {
  if (data.type === "start") return start(data);
  queue = queue.then(() => call(data));
};

async function start({ backend, reason }) {
  try {
    wasm = await init();
    const engine = await pickEngine(backend, reason);
    post(await probe(engine));
    session = new Session(engine);
    post({
      type: "ready",
      fields: Session.settings_fields(),
      builtin: Session.builtin_prompts(),
    });
  } catch (e) {
    post({ type: "error", message: String(e) });
  }
}

async function call({ id, method, args }) {
  try {
    let value;
    if (STATIC.has(method)) value = Session[method](...args);
    else if (METHODS.has(method)) value = await session[method](...args);
    else throw `no engine method ${JSON.stringify(method)}`;
    post({ type: "reply", id, value, memory: memory() }, value instanceof Uint8Array ? [value.buffer] : []);
  } catch (e) {
    post({ type: "reply", id, error: String(e), fatal: typeof e !== "string", memory: memory() });
  }
}

// The wasm heap only grows, so its size is also its peak.
const memory = () => wasm?.memory.buffer.byteLength;

async function pickEngine(wanted, reason) {
  if (wanted !== "cpu") {
    post({ type: "status", text: "Looking for a WebGPU adapter…" });
    const found = await findAdapter();
    if (found.adapter) {
      const engine = await Engine.webgpu();
      post({
        type: "engine", backend: "webgpu", adapter: found.adapter, limits: JSON.parse(engine.limits()), precision: engine.precision(),
        reason: wanted === "webgpu" ? "WebGPU requested (?backend=webgpu)" : "a WebGPU adapter is available",
      });
      return engine;
    }
    reason = found.reason;
  }
  const engine = await Engine.cpu();
  post({ type: "engine", backend: "cpu", reason, precision: engine.precision() });
  return engine;
}

async function probe(engine) {
  post({ type: "status", text: `Running the self-check on ${engine.backend()}…` });
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
