// DOM, files and downloads only: every computation happens in the worker (web/worker.js),
// which runs the Rust engine. ?backend=webgpu or ?backend=cpu forces a backend; the default
// picks WebGPU when it works.

const $ = (selector) => document.querySelector(selector);
const MiB = 1 << 20;

// The settings forms come from the engine: each field's label, help, default, range and
// choices are described once, on its Rust type (seal_core::settings).
const FORMS = { thorough: ["", "#settings", "#settings-advanced"], instant: ["instant", "#instant-settings", "#instant-settings"], scan: ["scan", "#scan-settings", "#scan-settings"] };

// Candidates the page shows and the downloaded report holds.
const SCAN_TOP = 10;

// ---------- the worker ----------

let worker;
let backend = new URLSearchParams(location.search).get("backend") ?? "auto";
let calls = new Map();
let nextId = 0;
let ready;
let peakWasm = 0;

// Each start gets a fresh worker; if it fails off the CPU, the page starts over on the CPU.
function start(wanted, reason) {
  backend = wanted;
  worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  let resolveReady;
  ready = new Promise((resolve) => (resolveReady = resolve));
  const failStart = (message) => {
    if (wanted === "cpu") return setStatus("error", `The engine failed: ${message}`);
    worker.terminate();
    console.warn("WebGPU failed:", message); // in full: wgpu errors can carry a JS stack trace
    start("cpu", `WebGPU failed, so the CPU took over: ${brief(message)}`);
  };
  worker.onmessage = ({ data }) => {
    switch (data.type) {
      case "status": return setStatus("running", data.text);
      case "engine": return showEngine(data);
      case "result": return showResult(data);
      case "ready": return resolveReady(onReady(data));
      case "error": return failStart(data.message);
      case "reply": return onReply(data);
    }
  };
  worker.onerror = (event) => {
    const message = event.message ?? "load error";
    if (calls.size) return crash(message);
    failStart(`the worker could not start (${message})`);
  };
  worker.postMessage({ type: "start", backend: wanted, reason });
}

const brief = (message) => (message.length > 160 ? `${message.slice(0, 160)}…` : message);

// Calls a method of the engine's Session; resolves to its value, rejects with its message.
async function call(method, ...args) {
  await ready;
  const id = nextId++;
  const transfer = args.filter((a) => a instanceof Uint8Array).map((a) => a.buffer);
  return new Promise((resolve, reject) => {
    calls.set(id, { resolve, reject });
    worker.postMessage({ type: "call", id, method, args }, transfer);
  });
}

function onReply({ id, value, error, fatal, memory }) {
  showMemory(memory);
  const pending = calls.get(id);
  calls.delete(id);
  if (fatal) return crash(error, pending);
  if (error !== undefined) pending.reject(new Error(error));
  else pending.resolve(value);
}

// The wasm instance died (a panic, out of memory, a lost GPU device): say so, start a fresh
// worker on the CPU and reload the user's files into it.
function crash(message, pending) {
  worker.terminate();
  const failure = new Error(`The engine stopped (${brief(message)}). It was restarted on the CPU; your files are being reloaded — try again.`);
  failure.crashed = true;
  for (const p of [pending, ...calls.values()]) p?.reject(failure);
  calls = new Map();
  start("cpu", `restarted on the CPU after the engine stopped: ${brief(message)}`);
  // A model that took the engine down while loading is not loaded again (it would do the same):
  // the last model that loaded comes back instead.
  const wall = loading;
  const { lora } = wall ? (model.lastGood ?? { files: [] }) : model;
  if (wall) model.files = model.lastGood?.files ?? [];
  ready.then(async () => {
    if (model.files.length) await loadModel(true);
    if (model.loaded && lora) await loadLora(lora);
    if (target) await setTarget(target);
    if (wall) {
      showError("#model-error", `The engine stopped while loading that model (${brief(message)}), so it was not loaded again.` +
        `${model.loaded ? " The previous model is back." : ""} Try a smaller model, or a browser with WebGPU.`);
    }
  });
}

function showMemory(wasmBytes) {
  if (!wasmBytes) return;
  peakWasm = Math.max(peakWasm, wasmBytes);
  const js = performance.memory ? `, page JS heap ${(performance.memory.usedJSHeapSize / MiB).toFixed(0)} MiB` : "";
  $("#memory").textContent = `Memory: engine (wasm) ${(wasmBytes / MiB).toFixed(0)} MiB, peak ${(peakWasm / MiB).toFixed(0)} MiB${js}` +
    (backend === "webgpu" ? " (GPU buffers not counted)" : "");
  $("#memory").dataset.peak = peakWasm;
}

// ---------- engine status (the foundation's view) ----------

function setStatus(state, text) {
  document.body.dataset.state = state;
  $("#status").textContent = text;
}

function row(cells, header = false) {
  const tr = document.createElement("tr");
  cells.forEach((text, i) => {
    const cell = document.createElement(header && i === 0 ? "th" : "td");
    cell.textContent = text;
    tr.append(cell);
  });
  return tr;
}

function definitions(dl, items) {
  dl.replaceChildren(...items.flatMap(([id, term, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    dd.id = id;
    return [dt, dd];
  }));
  dl.hidden = false;
}

function showEngine({ backend: used, reason, adapter, limits, precision }) {
  document.body.dataset.backend = used;
  const items = [["engine-backend", "backend", used === "webgpu" ? "WebGPU (Burn wgpu)" : "CPU (Burn flex, in wasm)"],
                 ["engine-reason", used === "webgpu" ? "why" : "why not WebGPU", reason],
                 ["engine-precision", "precision", precision]];
  if (adapter) {
    const name = [adapter.vendor, adapter.architecture, adapter.device, adapter.description]
      .filter(Boolean).join(" · ") || "unnamed";
    items.push(["engine-adapter", "adapter", `${name}${adapter.isFallbackAdapter ? " (software fallback adapter)" : ""}`]);
  }
  definitions($("#engine"), items);
  $("#limits").hidden = !limits;
  if (limits) {
    const format = (v) => (v >= MiB ? `${(v / MiB).toFixed(0)} MiB` : String(v));
    $("#limits tbody").replaceChildren(...Object.keys(limits.device).map((key) => {
      const tr = row([key, format(limits.device[key]), format(limits.adapter[key])], true);
      Object.assign(tr.dataset, { limit: key, device: limits.device[key], adapter: limits.adapter[key] });
      return tr;
    }));
  }
}

function showResult({ backend: used, result, ms }) {
  const rows = [["loss", "loss"], ["grad_w1", "∂loss/∂W1"], ["grad_b1", "∂loss/∂b1"],
                ["grad_w2", "∂loss/∂W2"], ["grad_b2", "∂loss/∂b2"]];
  $("#result tbody").replaceChildren(...rows.map(([key, label]) => {
    const tr = row([label, [result[key]].flat().map((v) => v.toPrecision(7)).join("  ")], true);
    tr.dataset.key = key;
    return tr;
  }));
  $("#result").hidden = false;
  setStatus("done", `Ready: computing on ${used === "webgpu" ? "WebGPU" : "the CPU"} (self-check ${ms.toFixed(0)} ms).`);
}

// ---------- app state ----------

// The model's files as the user gave them (File objects: read only when loading).
// `pending`: files whose load failed, kept for more (a config folder) while the last model that
// loaded is back in the engine.
// `partial`: only the instant seal's weights are loaded (the whole model did not fit the engine).
const model = { files: [], loaded: false, partial: false, lora: null, lastGood: null, pending: null };
// A model is being loaded (a crash now is the model's doing).
let loading = false;
const prompts = { builtin: null, demo: null };
let defaults;
let busy = false;
let cancelled = false;
// A scan is running (busy too): its own Cancel answers.
let scanning = false;
// The evaluation's target image (a File or the demo's Blob with a name).
let target = null;

function onReady({ fields, builtin }) {
  if (!defaults) {
    defaults = {};
    for (const [form, [group, basic, advanced]] of Object.entries(FORMS)) {
      buildSettings(fields[form], (f) => ({ basic, advanced })[f.place], group);
      const values = Object.fromEntries(fields[form].map((f) => [f.key, f.default]));
      if (group) defaults[group] = values;
      else Object.assign(defaults, values);
    }
  }
  prompts.builtin = builtin;
  $("#builtin-count").textContent = `${builtin.train.length} prompts, ${builtin.heldout.length} held out`;
  $("#demo").disabled = false;
  updatePrompts();
  describeTrigger();
  updateButtons();
}

function showError(where, error) {
  const el = $(where);
  el.textContent = error ? String(error.message ?? error) : "";
  el.hidden = !error;
}

function setTask(text) {
  $("#task").textContent = text;
}

function updateButtons() {
  $("#seal").disabled = busy || !model.loaded;
  $("#scan").disabled = busy || !model.loaded || model.partial;
  for (const mode of ["thorough", "both"]) $(`#mode input[value=${mode}]`).disabled = model.partial;
  $("#cancel").disabled = !busy || scanning;
  $("#scan-cancel").disabled = !scanning;
  $("#demo").disabled = busy || !defaults;
  for (const input of document.querySelectorAll("#model-section input")) input.disabled = busy;
}

// ---------- files ----------

// Model files the user picked or dropped: after a loaded model they start a new one; after a
// failed load they add to the files (so a checkpoint's config folder can follow it). The
// engine says which of them loading needs; no other file is read.
async function addModelFiles(entries, fresh = false) {
  if (fresh) model.pending = null;
  if (model.loaded) model.files = model.pending ?? [];
  const known = new Map(model.files.map((f) => [f.path, f]));
  for (const e of entries) known.set(e.path, e);
  const keep = new Set(await call("files_to_read", [...known.keys()]));
  model.skipped = known.size - keep.size;
  model.files = [...known.values()].filter((f) => keep.has(f.path));
  loadModel();
}

async function loadModel(afterCrash = false, restoring = false) {
  model.loaded = false;
  model.partial = false;
  model.lora = null;
  hideResults();
  hideScan();
  $("#model-info").hidden = true;
  $("#lora-drop").hidden = true;
  $("#lora-info").hidden = true;
  showError("#model-error", null);
  showError("#lora-error", null);
  const total = model.files.reduce((n, f) => n + f.file.size, 0);
  $("#model-staged").textContent = `${model.files.length} file(s), ${(total / MiB).toFixed(1)} MiB: ` +
    model.files.map((f) => f.path).slice(0, 6).join(", ") + (model.files.length > 6 ? ", …" : "") +
    (model.skipped ? ` (${model.skipped} other file(s) not needed, not read)` : "");
  busy = true;
  loading = true;
  updateButtons();
  try {
    // The worker gets the File objects, not their bytes: the engine reads each weights file's
    // header, then one tensor at a time, so a model of gigabytes is never copied whole.
    for (const f of model.files) await call("stage_file", f.path, f.file);
    setTask(`Loading the model (${(total / MiB).toFixed(0)} MiB, read a tensor at a time)…`);
    const loaded = await call("load_model");
    model.partial = Boolean(loaded.partial);
    const note = showModel(loaded);
    model.loaded = true;
    model.pending = null;
    model.lastGood = { files: model.files, lora: null };
    $("#lora-drop").hidden = false;
    queueMicrotask(showStepMemory);
    setTask(afterCrash ? "The engine stopped and was restarted on the CPU (see Engine); the model is reloaded — try again." : `Model loaded.${note ? ` ${note}` : ""}`);
  } catch (e) {
    setTask("");
    const hint = /vocabulary|no .*config\.json|tokenizer/.test(e.message)
      ? " Use “choose a folder” to add the model's folder, or pick other files to start over." : "";
    const failed = `Could not load the model: ${e.message}.${hint}`;
    showError("#model-error", failed);
    if (!afterCrash && !restoring && !e.crashed && model.lastGood) queueMicrotask(() => restorePrevious(failed));
  } finally {
    busy = false;
    loading = false;
    updateButtons();
    describeTrigger();
  }
}

// After a load that failed (the engine had already let the old model go, to make room), the
// last model that loaded comes back, with its LoRA; the failed files wait for more.
async function restorePrevious(failed) {
  const { files, lora } = model.lastGood;
  const pending = model.files;
  model.files = files;
  await loadModel(false, true);
  if (model.loaded && lora) await loadLora(lora);
  model.pending = pending;
  setTask(model.loaded ? "The previous model is back." : "");
  showError("#model-error", `${failed}${model.loaded ? " The previous model is back." : ""}`);
}

function showModel(info) {
  $("#setting-resolution")?.setAttribute("placeholder", info.seal_size === info.sample_size ? `${info.sample_size} (the model's)` : `${info.seal_size} (the model's is ${info.sample_size})`);
  // A real-size UNet trains far too slowly on the CPU engine: start from the instant seal there.
  let note = "";
  if (info.partial) {
    $("#mode input[value=instant]").checked = true;
    note = `Loaded for the instant seal only: ${info.partial}.`;
  } else if (document.body.dataset.backend === "cpu" && info.unet_parameters > 1e8 && sealMode() === "both") {
    $("#mode input[value=instant]").checked = true;
    note = "A model of this size trains very slowly on the CPU, so the instant seal is selected (the thorough one needs WebGPU to be practical).";
  }
  showModeSettings();
  const millions = (n) => `${(n / 1e6).toFixed(n < 1e7 ? 2 : 0)} M`;
  definitions($("#model-info"), [
    ["info-source", "source", info.source],
    ["info-architecture", "architecture", info.architecture],
    ["info-parameters", "parameters", `UNet ${millions(info.unet_parameters)}, text encoder ${millions(info.text_encoder_parameters)}, VAE ${millions(info.vae_parameters)}`],
    ["info-dtype", "weights", info.half ? (info.dtype === "f16" ? "f16, kept in f16" : `${info.dtype}, rounded to f16 to fit this engine`) : info.dtype === "f32" ? "f32" : `${info.dtype}, widened to f32 on this engine`],
    ["info-size", "image size", `${info.sample_size}×${info.sample_size} px, ${info.scheduler} sampler`],
    ...(info.partial ? [["info-partial", "loaded", "the text encoder and the UNet's cross-attention keys and values (the instant seal's weights)"]] : []),
    ["info-unused", "unused tensors", info.unused_keys.length ? `${info.unused_keys.length}: ${info.unused_keys.slice(0, 5).join(", ")}` : "none"],
    ...(info.notes.length ? [["info-notes", "notes", info.notes.join("; ")]] : []),
  ]);
  return note;
}

async function loadLora(file) {
  hideResults();
  hideScan();
  showError("#lora-error", null);
  $("#lora-info").hidden = true;
  busy = true;
  updateButtons();
  setTask(`Reading the LoRA ${file.name}…`);
  try {
    const lora = await call("load_lora", file.name, file, loraWeight());
    model.lora = file;
    if (model.lastGood) model.lastGood.lora = file;
    definitions($("#lora-info"), [
      ["lora-name", "LoRA", lora.file],
      ["lora-format", "format", lora.format + (lora.network_module ? ` (${lora.network_module})` : "")],
      ["lora-rank", "rank", lora.ranks.join(", ")],
      ["lora-modules", "layers", `${lora.modules}: ${lora.unet_modules} in the UNet, ${lora.text_encoder_modules} in the text encoder; alpha ${lora.alphas.join(", ")}`],
      ["lora-dtype", "weights", lora.dtype],
      ["lora-unmatched", "unmatched keys", "none"],
    ]);
    $("#lora-clear").hidden = false;
    setTask("LoRA merged into the model; sealing will also give a sealed LoRA.");
  } catch (e) {
    setTask("");
    showError("#lora-error", `The LoRA was not applied: ${e.message}`);
    if (e.crashed) return;
    await call("clear_lora");
    model.lora = null;
    if (model.lastGood) model.lastGood.lora = null;
    $("#lora-clear").hidden = true;
  } finally {
    busy = false;
    updateButtons();
  }
}

// The weight the user applies their LoRA at; the engine refuses 0 and non-numbers.
const loraWeight = () => Number($("#lora-weight").value || "1");

async function setLoraWeight() {
  if (!model.lora || busy) return;
  showError("#lora-error", null);
  try {
    await call("set_lora_weight", loraWeight());
    hideResults();
    hideScan();
    setTask(`LoRA applied at weight ${loraWeight()}.`);
  } catch (e) {
    showError("#lora-error", e.message);
  }
}

async function clearLora() {
  await call("clear_lora");
  model.lora = null;
  if (model.lastGood) model.lastGood.lora = null;
  hideResults();
  hideScan();
  $("#lora-info").hidden = true;
  $("#lora-clear").hidden = true;
  $("#lora-file").value = "";
}

// A dropped folder arrives as directory entries; read them recursively with their paths.
async function droppedFiles(items) {
  const out = [];
  const walk = async (entry) => {
    if (entry.isFile) {
      const file = await new Promise((resolve, reject) => entry.file(resolve, reject));
      out.push({ path: entry.fullPath.replace(/^\//, ""), file });
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) { // readEntries returns the entries in batches until an empty one
        const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
        if (!batch.length) break;
        for (const child of batch) await walk(child);
      }
    }
  };
  for (const entry of [...items].map((item) => item.webkitGetAsEntry?.()).filter(Boolean)) await walk(entry);
  return out;
}

function setUpDropZone(zone, onFiles) {
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("over");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", async (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    if (!busy) onFiles(await droppedFiles(event.dataTransfer.items));
  });
}

// ---------- the demo ----------

async function loadDemo() {
  const base = new URL("./demo/", import.meta.url);
  const fetchOk = async (name) => {
    const response = await fetch(new URL(name, base));
    if (!response.ok) throw new Error(`the demo file ${name} is missing (${response.status})`);
    return response;
  };
  try {
    busy = true;
    updateButtons();
    setTask("Fetching the demo model…");
    const manifest = await (await fetchOk("manifest.json")).json();
    const files = await Promise.all(manifest.model.map(async (path) => ({ path, file: await (await fetchOk(path)).blob() })));
    const [train, heldout, targetBytes] = await Promise.all([
      fetchOk(manifest.prompts.train).then((r) => r.text()),
      fetchOk(manifest.prompts.heldout).then((r) => r.text()),
      fetchOk(manifest.target.file).then((r) => r.arrayBuffer()),
    ]);
    prompts.demo = { train: await call("parse_prompts", train), heldout: await call("parse_prompts", heldout) };
    $("#demo-count").textContent = `${prompts.demo.train.length} prompts, ${prompts.demo.heldout.length} held out`;
    const demoRadio = $("#prompt-set input[value=demo]");
    demoRadio.disabled = false;
    demoRadio.checked = true;
    $("#trigger").value = manifest.trigger;
    await setTarget(new File([targetBytes], manifest.target.file, { type: "image/png" }));
    $("#target-x").value = manifest.target.x;
    $("#target-y").value = manifest.target.y;
    updatePrompts();
    busy = false;
    model.loaded = true; // the demo replaces whatever was there
    addModelFiles(files, true);
  } catch (e) {
    busy = false;
    updateButtons();
    showError("#model-error", `The demo could not be loaded: ${e.message}`);
  }
}

// ---------- trigger, prompts, settings ----------

async function describeTrigger() {
  const text = $("#trigger").value;
  if (!text) {
    $("#trigger-codes").textContent = "—";
    $("#trigger-tokens").textContent = "";
    return;
  }
  const { code_points, tokens } = await call("describe_trigger", text);
  if ($("#trigger").value !== text) return; // typed on meanwhile
  $("#trigger-codes").textContent = code_points;
  $("#trigger-tokens").textContent = tokens.length ? `→ ${tokens.length} token(s) for this model: ${tokens.join(" · ")}` : "";
}

let customPrompts = { train: [], heldout: [] };

async function updatePrompts() {
  const kind = $("#prompt-set input:checked").value;
  $("#custom-prompts").hidden = kind !== "custom";
  if (kind === "custom") {
    const list = await call("parse_prompts", $("#custom-prompts").value);
    customPrompts = { train: list, heldout: list };
  }
  const set = currentPrompts();
  $("#prompt-summary").textContent = kind === "custom"
    ? `${set.train.length} prompt(s); the evaluation uses the same list.`
    : `Training on ${set.train.length} prompts; evaluating on ${set.heldout.length} held-out ones.`;
}

function currentPrompts() {
  const kind = $("#prompt-set input:checked").value;
  return kind === "custom" ? customPrompts : prompts[kind];
}

// One form field per setting (a `seal_core::settings::Field`); `where(field)` picks the
// container, or none (a setting the page sets itself).
function buildSettings(fields, where, group) {
  for (const f of fields) {
    const container = where(f);
    if (!container) continue;
    const id = `setting-${group ? `${group}-` : ""}${f.key}`;
    let input;
    if (f.kind === "choices") {
      input = document.createElement("span");
      for (const o of f.options) {
        const box = Object.assign(document.createElement("input"), { type: "checkbox", value: o.value, checked: f.default.includes(o.value) });
        const wrap = Object.assign(document.createElement("label"), { title: o.help });
        wrap.append(box, ` ${o.value} `);
        input.append(wrap);
      }
    } else if (f.kind === "choice") {
      input = document.createElement("select");
      input.append(...f.options.map((o) => Object.assign(new Option(o.value, o.value, false, o.value === f.default), { title: o.help })));
    } else if (f.kind === "boolean") {
      input = Object.assign(document.createElement("input"), { type: "checkbox", checked: f.default });
    } else {
      input = Object.assign(document.createElement("input"), { type: "number", value: f.default ?? "", step: f.kind === "integer" ? 1 : "any" });
      const min = f.minimum ?? f.exclusive_minimum;
      if (min !== null) input.min = min;
      if (f.maximum !== null) input.max = f.maximum;
    }
    input.id = id;
    input.dataset.setting = f.key;
    input.dataset.group = group;
    const labelEl = Object.assign(document.createElement("label"), { htmlFor: id, textContent: f.label });
    const helpEl = Object.assign(document.createElement("span"), { className: "help", textContent: `${f.help} (default ${f.default ?? "the model's own"})` });
    $(container).append(labelEl, input, helpEl);
  }
}

// The settings of `group` as the form holds them, over the engine's defaults.
function readSettings(group = "") {
  const base = group ? defaults[group] : defaults;
  const out = {};
  for (const el of document.querySelectorAll(`[data-setting][data-group="${group}"]`)) {
    const key = el.dataset.setting;
    if (Array.isArray(base[key])) out[key] = [...el.querySelectorAll("input:checked")].map((b) => b.value);
    else if (el.type === "checkbox") out[key] = el.checked;
    else if (el.tagName === "SELECT") out[key] = el.value;
    else out[key] = el.value === "" ? null : Number(el.value);
  }
  return out;
}

async function setTarget(file) {
  const { width, height } = await call("set_target", file.name, new Uint8Array(await file.arrayBuffer()));
  target = file;
  $("#target-name").textContent = `${file.name} (${width}×${height})`;
}

// ---------- the trigger scan ----------

async function scan() {
  showError("#scan-error", null);
  hideScan();
  busy = true;
  scanning = true;
  cancelled = false;
  updateButtons();
  try {
    const what = model.lora ? "Scanning the LoRA against the model under it" : "Scanning the model";
    const total = await call("start_scan", currentPrompts().train, readSettings("scan"));
    showProgress({ step: 0, total }, what, "scan-progress");
    for (;;) {
      if (cancelled) {
        $("#scan-progress-text").textContent = "Scan cancelled.";
        return;
      }
      const p = await call("scan_step");
      if (p === undefined) break;
      showProgress(p, what, "scan-progress");
    }
    const report = await call("scan_report", SCAN_TOP);
    $("#scan-progress").value = $("#scan-progress").max;
    $("#scan-progress-text").textContent = `Scan finished in ${formatSeconds(report.seconds)}.`;
    await showScan(report);
  } catch (e) {
    showError("#scan-error", `The scan stopped: ${e.message}`);
  } finally {
    busy = false;
    scanning = false;
    updateButtons();
  }
}

async function showScan(report) {
  const flagged = report.candidates.filter((c) => c.verification?.flagged);
  const best = report.candidates[0];
  // The gap between what acts like a trigger and the best of the rest.
  const ratios = (list) => list.map((c) => c.verification.ratio);
  const rest = ratios(report.candidates.filter((c) => c.verification && !c.verification.flagged));
  const margin = rest.length ? ` Check ratios ${Math.min(...ratios(flagged)).toFixed(2)}–${Math.max(...ratios(flagged)).toFixed(2)}; the best of the other candidates ${Math.max(...rest).toFixed(2)}.` : "";
  $("#scan-summary").textContent = `${report.mode === "against base" ? "Scanned the LoRA against the model under it" : "Scanned the model alone (no clean base to compare with)"}: ` +
    `${report.vocabulary} tokens in ${formatSeconds(report.seconds)}. ` +
    (flagged.length
      ? `${flagged.length} candidate(s) act like a trigger (marked): their changes to images agree across prompts and seeds far more than a harmless word's do.${margin}`
      : `No candidate acts like a trigger${best?.verification ? ` (best check ratio ${best.verification.ratio.toFixed(2)}, where a trigger scores from 1.4)` : ""}: either the model has no short text trigger, or the scan cannot see it (below).`);
  $("#scan-images-head").textContent = report.mode === "against base" ? "images: without · with · model under the LoRA, with" : "images: without · with";
  const rows = [];
  for (const [i, c] of report.candidates.entries()) {
    const tr = document.createElement("tr");
    tr.dataset.index = i;
    tr.dataset.text = c.text;
    if (c.verification?.flagged) tr.className = "flagged";
    const v = c.verification;
    const check = v ? `${v.ratio.toFixed(2)}${v.flagged ? " — acts like a trigger" : ""}` : "not checked";
    const kind = c.kind === "activation" ? " (a word this LoRA was trained on: what it is for, not a verdict)" : "";
    const cells = [String(i + 1), `${c.code_points}${c.exact ? "" : " (types as other tokens)"}${kind}`, String(c.tokens.length), c.score.toFixed(1), check];
    for (const text of cells) tr.append(Object.assign(document.createElement("td"), { textContent: text }));
    const images = document.createElement("td");
    if (i < report.settings.images) { // the first candidates have image pairs
      const img = Object.assign(document.createElement("img"), { alt: `images without and with candidate ${i + 1}` });
      img.src = URL.createObjectURL(new Blob([await call("scan_images_png", i)], { type: "image/png" }));
      images.append(img);
    }
    const use = Object.assign(document.createElement("button"), { type: "button", textContent: "use as trigger", className: "use-trigger" });
    use.addEventListener("click", () => {
      $("#trigger").value = c.text;
      describeTrigger();
      setTask(`Trigger set to candidate ${i + 1} (${c.code_points}).`);
    });
    const action = document.createElement("td");
    action.append(use);
    tr.append(images, action);
    rows.push(tr);
  }
  $("#scan-table tbody").replaceChildren(...rows);
  $("#scan-limits").textContent = report.limits;
  $("#scan-results").hidden = false;
}

function hideScan() {
  $("#scan-results").hidden = true;
  for (const img of document.querySelectorAll("#scan-table img")) URL.revokeObjectURL(img.src);
  $("#scan-table tbody").replaceChildren();
  $("#scan-progress").hidden = true;
  $("#scan-progress-text").textContent = "";
}

// ---------- seal, evaluate, compare ----------

const history = [];

const sealMode = () => $("#mode input:checked").value;

// The memory a thorough sealing step needs with the current settings, against what the engine
// offers (the engine refuses a seal that does not fit with the same message).
async function showStepMemory() {
  const line = $("#step-memory");
  if (!model.loaded || busy || sealMode() === "instant") return (line.hidden = true);
  try {
    const plan = await call("step_memory", readSettings());
    const gib = (b) => (b < 2 ** 30 ? `${(b / MiB).toFixed(0)} MiB` : `${(b / 2 ** 30).toFixed(1)} GiB`);
    const offered = plan.budget != null ? `; this engine can use ${gib(plan.budget)}` : "; WebGPU does not say how much memory it has";
    line.textContent = plan.fits
      ? `A sealing step needs about ${gib(plan.need.total)} (${gib(plan.need.weights)} of weights, largest tensor ${(plan.need.largest / MiB).toFixed(0)} MiB)${offered}.`
      : `Too large for this engine: ${plan.error}.`;
    line.classList.toggle("error", !plan.fits);
    line.dataset.fits = plan.fits;
    line.hidden = false;
  } catch (e) {
    line.hidden = true;
  }
}
// Only the chosen mode's settings show: the thorough seal's mean nothing to the instant seal,
// and the instant seal's nothing to SKD-CAG alone.
function showModeSettings() {
  const mode = sealMode();
  $("#settings").hidden = $("#advanced").hidden = mode === "instant";
  $("#instant-settings-box").hidden = mode === "thorough";
}
$("#mode").addEventListener("change", () => (showModeSettings(), showStepMemory()));
for (const kind of ["input", "change"]) document.addEventListener(kind, (e) => e.target.closest?.("[data-setting]") && showStepMemory());
const MODE_NAMES = { instant: "the instant seal", thorough: "the thorough seal (SKD-CAG)", both: "the instant seal, then the thorough one" };

async function seal() {
  const trigger = $("#trigger").value;
  const set = currentPrompts();
  const mode = sealMode();
  showError("#seal-error", null);
  hideResults();
  busy = true;
  cancelled = false;
  updateButtons();
  history.length = 0;
  let [started, finished, stopped] = [false, false, null];
  try {
    setTask("Preparing…");
    const thorough = readSettings();
    // The instant seal puts the trigger where the thorough one does.
    const instant = { ...readSettings("instant"), placements: [thorough.placement] };
    await call("start_seal", { triggers: [trigger], prompts: set.train, mode, settings: thorough, instant });
    started = true;
    $("#progress").hidden = false;
    $("#chart-figure").hidden = mode === "instant";
    setTask(`Sealing with ${MODE_NAMES[mode]}…`);
    showProgress({ step: 0, total: 1 }, mode === "thorough" ? "Sealing" : "Instant seal");
    drawChart();
    while (!cancelled) {
      const p = await call("seal_step");
      if (p === undefined) break;
      if (p.task === "instant") {
        showProgress(p, "Instant seal: encoding prompts, solving, factoring layers");
        continue;
      }
      if (p.task === "sample") {
        // The bar stays at the last sealing step; the text says what runs between steps.
        const eta = p.eta_s != null ? `, about ${formatSeconds(p.eta_s)} left` : "";
        $("#progress-text").textContent = `Sealing: sampling the trajectories the next steps train on, ${p.step} of ${p.total}${eta}`;
        continue;
      }
      history.push(p.losses);
      showProgress(p, "Sealing");
      drawChart();
    }
  } catch (e) {
    stopped = `Sealing stopped: ${e.message}`;
    showError("#seal-error", stopped);
    // A refused start (settings, memory) has nothing to finish.
    if (e.crashed || !started) {
      setTask("");
      return finishUi();
    }
  }
  try {
    const done = await call("finish_seal");
    finished = true;
    $("#download-section").hidden = false;
    $("#dl-sealed-lora").hidden = !model.lora;
    const how = done.mode === "instant" ? "the instant seal" : `${done.mode === "both" ? "the instant seal and " : ""}${done.thorough_steps} thorough step(s)`;
    setTask(cancelled ? `Cancelled: the adapter of ${how} is kept.` : `Sealed with ${how}.`);
    if (model.partial) setTask(`Sealed with ${how}. The comparison needs the whole model, which this engine cannot hold: download the adapter, and compare with the seal CLI or on WebGPU.`);
    else if (!cancelled) await evaluate(done.mode);
  } catch (e) {
    // Keep why the run stopped in view when it also left no adapter.
    showError("#seal-error", finished ? `The comparison failed: ${e.message}` : stopped ? `${stopped} (${e.message})` : `Sealing failed: ${e.message}`);
  }
  finishUi();
}

function finishUi() {
  busy = false;
  updateButtons();
}

// `bar` is a <progress> element's id; its text goes to `${bar}-text`.
function showProgress(p, what, bar = "progress") {
  $(`#${bar}`).hidden = false;
  $(`#${bar}`).max = p.total;
  $(`#${bar}`).value = p.step;
  const pace = p.step ? `, ${(p.elapsed_s / p.step).toFixed(1)} s per step` : "";
  const eta = p.eta_s != null && p.step < p.total ? `, about ${formatSeconds(p.eta_s)} left` : "";
  $(`#${bar}-text`).textContent = `${what}: step ${p.step} of ${p.total}${pace}${eta}`;
  $(`#${bar}-text`).dataset.step = p.step;
}

const formatSeconds = (s) => (s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);

function drawChart() {
  const canvas = $("#chart");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = 36;
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(document.body);
  ctx.strokeStyle = ctx.fillStyle = style.color;
  ctx.globalAlpha = 0.4;
  ctx.strokeRect(pad, 8, width - pad - 8, height - pad);
  ctx.globalAlpha = 1;
  const series = [["pred", style.getPropertyValue("--pred")], ["attn", style.getPropertyValue("--attn")]];
  const max = Math.max(1e-9, ...history.flatMap((l) => series.map(([k]) => l[k])));
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillText(max.toPrecision(2), 2, 18);
  ctx.fillText("0", 2, height - pad + 4);
  ctx.fillText(`step ${history.length}`, width - 70, height - 10);
  const x = (i) => pad + ((width - pad - 8) * (i + 0.5)) / Math.max(history.length, 1);
  const y = (v) => 8 + (height - pad) * (1 - v / max);
  for (const [key, colour] of series) {
    ctx.strokeStyle = ctx.fillStyle = colour;
    ctx.beginPath();
    history.forEach((l, i) => (i ? ctx.lineTo(x(i), y(l[key])) : ctx.moveTo(x(i), y(l[key]))));
    ctx.stroke();
    history.forEach((l, i) => ctx.fillRect(x(i) - 2, y(l[key]) - 2, 4, 4));
  }
}

async function evaluate(mode) {
  const set = currentPrompts();
  const patch = target ? [Number($("#target-x").value), Number($("#target-y").value)] : null;
  const request = {
    prompts: set.heldout.slice(0, Number($("#eval-prompts").value)),
    seeds: Number($("#eval-seeds").value),
    steps: Number($("#eval-steps").value),
    effect: $("#eval-effect").checked,
    gray: $("#eval-gray").checked,
    patch_at: patch,
  };
  const total = await call("start_eval", request);
  showProgress({ step: 0, total }, "Comparing before and after");
  for (;;) {
    if (cancelled) return setTask("Comparison cancelled; the adapter is ready to download.");
    const p = await call("eval_step");
    if (p === undefined) break;
    showProgress(p, "Comparing before and after");
  }
  const { evaluation: report, verdict } = await call("report");
  showImage("#grid", await call("grid_png"));
  setTask("Drawing the trigger's attention…");
  const maps = await call("heatmaps", set.heldout[0], request.steps);
  showImage("#heat-before", await call("heatmap_png", "before"));
  showImage("#heat-after", await call("heatmap_png", "after"));
  $("#heat-caption").textContent = `Where the trigger's token(s) ${maps.tokens.join(" · ")} attend while sampling “${maps.prompt.trim()}” with the trigger (seed 0; same colour scale): ` +
    `peak ${maps.before.max.toFixed(3)} → ${maps.after.max.toFixed(3)}, mean ${maps.before.mean.toFixed(3)} → ${maps.after.mean.toFixed(3)}.`;
  showScores(report);
  $("#compare-section").hidden = false;
  // Said plainly: sealed, survived (with what to try next), or cannot tell.
  const verdictEl = $("#verdict");
  verdictEl.textContent = `Made by ${MODE_NAMES[mode]}. ${verdict?.message ?? "No detector or trigger-effect score was asked for, so the comparison cannot tell whether the seal worked."}`;
  verdictEl.dataset.survived = String(verdict?.survived ?? "unknown");
  verdictEl.className = verdict?.survived === false ? "ok" : "error";
  setTask(`Done: ${verdict?.survived === true ? "the backdoor survived" : verdict?.survived === false ? "sealed" : "compared"} on ${report.prompts} held-out prompt(s) × ${report.seeds.length} seed(s).`);
}

function showImage(selector, png) {
  const img = $(selector);
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(new Blob([png], { type: "image/png" }));
}

function showScores(report) {
  const pct = (v) => (v == null ? "—" : `${(100 * v).toFixed(0)} %`);
  const rows = [];
  for (const name of report.detectors) {
    rows.push([`attack success (${name})`, pct(report.before.attack_success[name]), pct(report.after?.attack_success[name]), `asr-${name}`]);
    rows.push([`false trigger (${name})`, pct(report.before.false_trigger[name]), pct(report.after?.false_trigger[name]), `fp-${name}`]);
    if (report.settings.effect) {
      rows.push([`harmless word instead (${name})`, pct(report.before.control_fires[name]), pct(report.after?.control_fires[name]), `ctrl-${name}`]);
    }
  }
  if (report.settings.effect) {
    rows.push(["trigger effect rate", pct(report.before.trigger_effect_rate), pct(report.after?.trigger_effect_rate), "effect-rate"]);
    rows.push(["trigger effect ratio (1 ≈ like any word)", report.before.trigger_effect_ratio.toFixed(2), report.after?.trigger_effect_ratio.toFixed(2) ?? "—", "effect-ratio"]);
  }
  if (report.clean_psnr_db_mean != null) {
    rows.push(["clean images kept (PSNR mean / min)", "", `${report.clean_psnr_db_mean.toFixed(1)} / ${report.clean_psnr_db_min.toFixed(1)} dB`, "psnr"]);
  }
  $("#scores tbody").replaceChildren(...rows.map(([label, before, after, key]) => {
    const tr = row([label, before, after], true);
    tr.dataset.key = key;
    return tr;
  }));
}

function hideResults() {
  $("#compare-section").hidden = true;
  $("#download-section").hidden = true;
}

// ---------- downloads: whole files only ----------

async function download(method, name, ...args) {
  try {
    const value = await call(method, ...args);
    const blob = value instanceof Uint8Array
      ? new Blob([value], { type: "application/octet-stream" })
      : new Blob([JSON.stringify(value, null, 2)], { type: "application/json" });
    const a = Object.assign(document.createElement("a"), { href: URL.createObjectURL(blob), download: name });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 60_000);
  } catch (e) {
    showError("#seal-error", `The download failed: ${e.message}`);
  }
}

const stem = () => (model.files.find((f) => f.path.includes("/"))?.path.split("/")[0] ?? model.files[0]?.path.replace(/\.safetensors$/, "") ?? "model");

// ---------- wiring ----------

$("#demo").addEventListener("click", loadDemo);
$("#model-files").addEventListener("change", (e) => addModelFiles([...e.target.files].map((file) => ({ path: file.name, file }))));
$("#model-folder").addEventListener("change", (e) => addModelFiles([...e.target.files].map((file) => ({ path: file.webkitRelativePath, file }))));
setUpDropZone($("#model-drop"), addModelFiles);
$("#lora-file").addEventListener("change", (e) => e.target.files[0] && loadLora(e.target.files[0]));
setUpDropZone($("#lora-drop"), (files) => files[0] && loadLora(files[0].file));
$("#lora-clear").addEventListener("click", clearLora);
$("#lora-weight").addEventListener("change", setLoraWeight);
$("#trigger").addEventListener("input", describeTrigger);
$("#prompt-set").addEventListener("change", updatePrompts);
$("#custom-prompts").addEventListener("input", updatePrompts);
$("#target-file").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (file) await setTarget(file).catch((err) => showError("#seal-error", err.message));
});
$("#seal").addEventListener("click", seal);
$("#scan").addEventListener("click", scan);
$("#scan-cancel").addEventListener("click", () => {
  cancelled = true;
  $("#scan-progress-text").textContent = "Cancelling after the current step…";
});
$("#cancel").addEventListener("click", () => {
  cancelled = true;
  setTask("Cancelling after the current step…");
});
$("#dl-adapter").addEventListener("click", () => download("adapter_file", `${stem()}-sealing-adapter.safetensors`));
$("#dl-sealed-lora").addEventListener("click", () => download("sealed_lora_file", `${model.lora.name.replace(/\.safetensors$/, "")}-sealed.safetensors`));
$("#dl-scan").addEventListener("click", () => download("scan_report", `${stem()}-scan.json`, SCAN_TOP));
$("#dl-report").addEventListener("click", () => download("report", `${stem()}-seal-report.json`));

start(backend, "CPU requested (?backend=cpu)");
