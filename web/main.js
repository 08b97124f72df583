// DOM only: starts the worker that runs the engine and renders what it reports.
// ?backend=webgpu or ?backend=cpu forces a backend; the default picks WebGPU when it works.

const $ = (selector) => document.querySelector(selector);

// Each run gets a fresh worker; if anything fails off the CPU, the page starts over on the CPU.
function start(backend, reason) {
  const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  const fail = (message) => {
    if (backend === "cpu") return setStatus("error", `The engine failed: ${message}`);
    worker.terminate();
    console.warn("WebGPU failed:", message); // in full: wgpu errors can carry a JS stack trace
    const brief = message.length > 160 ? `${message.slice(0, 160)}…` : message;
    start("cpu", `WebGPU failed, so the CPU took over: ${brief}`);
  };
  worker.onmessage = ({ data }) => {
    switch (data.type) {
      case "status": return setStatus("running", data.text);
      case "engine": return showEngine(data);
      case "result": return showResult(data);
      case "error": return fail(data.message);
    }
  };
  worker.onerror = (event) => fail(`the worker could not start (${event.message ?? "load error"})`);
  worker.postMessage({ backend, reason });
}

start(new URLSearchParams(location.search).get("backend") ?? "auto", "CPU requested (?backend=cpu)");

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

function showEngine({ backend, reason, adapter, limits }) {
  document.body.dataset.backend = backend;
  const items = [["backend", "backend", backend === "webgpu" ? "WebGPU (Burn wgpu)" : "CPU (Burn flex, in wasm)"],
                 ["reason", backend === "webgpu" ? "why" : "why not WebGPU", reason]];
  if (adapter) {
    const name = [adapter.vendor, adapter.architecture, adapter.device, adapter.description]
      .filter(Boolean).join(" · ") || "unnamed";
    items.push(["adapter", "adapter", `${name}${adapter.isFallbackAdapter ? " (software fallback adapter)" : ""}`]);
  }
  $("#engine").replaceChildren(...items.flatMap(([id, term, value]) => {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    dd.id = `engine-${id}`;
    return [dt, dd];
  }));
  $("#limits").hidden = !limits;
  if (limits) {
    const format = (v) => (v >= 1 << 20 ? `${(v / (1 << 20)).toFixed(0)} MiB` : String(v));
    $("#limits tbody").replaceChildren(...Object.keys(limits.device).map((key) => {
      const tr = row([key, format(limits.device[key]), format(limits.adapter[key])], true);
      Object.assign(tr.dataset, { limit: key, device: limits.device[key], adapter: limits.adapter[key] });
      return tr;
    }));
  }
}

function showResult({ backend, result, ms }) {
  const rows = [["loss", "loss"], ["grad_w1", "∂loss/∂W1"], ["grad_b1", "∂loss/∂b1"],
                ["grad_w2", "∂loss/∂W2"], ["grad_b2", "∂loss/∂b2"]];
  $("#result tbody").replaceChildren(...rows.map(([key, label]) => {
    const tr = row([label, [result[key]].flat().map((v) => v.toPrecision(7)).join("  ")], true);
    tr.dataset.key = key;
    return tr;
  }));
  $("#result").hidden = false;
  setStatus("done", `Computed on ${backend === "webgpu" ? "WebGPU" : "the CPU"} in ${ms.toFixed(0)} ms.`);
}
