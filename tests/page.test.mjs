// Browser end-to-end tests of the engine start: the served page in Debian's headless Chromium,
// driven by playwright-core. Needs dist/ (./build.sh wasm) and the native CLI (SEAL_BIN, else
// `cargo run`); ./build.sh test does both.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import path from "node:path";
import { artifacts, openPage, root, startServer } from "./browser.mjs";

const KEYS = ["loss", "grad_w1", "grad_b1", "grad_w2", "grad_b2"];

let server;
let origin;
let native;

before(async () => {
  ({ server, origin } = await startServer());
  const [command, args] = process.env.SEAL_BIN
    ? [process.env.SEAL_BIN, ["probe"]]
    : ["cargo", ["run", "--quiet", "-p", "seal-cli", "--", "probe"]];
  native = JSON.parse(execFileSync(command, args, { cwd: root, encoding: "utf8" }));
});

after(() => server?.kill());

// Waits for the computation, saves a screenshot, and checks what every page run must satisfy.
async function finish({ page, response, requests, errors, foreign }, name) {
  await page.waitForSelector("body[data-state=done], body[data-state=error]", { timeout: 240_000 });
  await page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });
  assert.equal(await page.getAttribute("body", "data-state"), "done", await page.textContent("#status"));
  assert.deepEqual(errors, []);
  assert.match(response.headers()["content-security-policy"], /connect-src 'self'/);
  assert.ok(requests.has(`${origin}/dist/seal_web_bg.wasm`), "the worker's wasm fetch was observed");
  assert.deepEqual(foreign(), [], "requests to other origins");
  return {
    backend: await page.getAttribute("body", "data-backend"),
    reason: await page.textContent("#engine-reason"),
    shown: await page.$$eval("#result tr[data-key]", (rows) =>
      Object.fromEntries(rows.map((row) => [row.dataset.key, row.cells[1].textContent.trim().split(/\s+/).map(Number)]))),
  };
}

function assertMatchesNative(shown, rtol) {
  for (const key of KEYS) {
    const expected = [native[key]].flat();
    assert.equal(shown[key].length, expected.length, key);
    shown[key].forEach((value, i) => {
      const tolerance = rtol * Math.abs(expected[i]) + 1e-6;
      assert.ok(Math.abs(value - expected[i]) <= tolerance, `${key}[${i}]: page ${value}, native ${expected[i]}`);
    });
  }
}

test("the server sends the CSP and wasm MIME type and serves nothing outside the page", async () => {
  const page = await fetch(`${origin}/`);
  assert.equal(page.status, 200);
  assert.equal(page.headers.get("content-security-policy").split("; ")[0], "default-src 'self'");
  assert.match(page.headers.get("content-security-policy"), /script-src 'self' 'wasm-unsafe-eval'/);
  const wasm = await fetch(`${origin}/dist/seal_web_bg.wasm`);
  assert.equal(wasm.headers.get("content-type"), "application/wasm");
  for (const hidden of ["/Cargo.toml", "/web/serve.py", "/.git/HEAD", "/web/"]) {
    assert.equal((await fetch(`${origin}${hidden}`)).status, 404, hidden);
  }
});

test("?backend=cpu computes the probe on Burn's CPU backend in the worker, as natively", async () => {
  const run = await openPage(origin, "?backend=cpu");
  try {
    const { backend, reason, shown } = await finish(run, "cpu");
    assert.equal(backend, "cpu");
    assert.match(reason, /CPU requested/);
    assert.match(await run.page.textContent("#engine-precision"), /kept in f16 \(the CPU engine computes in f16, self-check within \d\.\de-\d+\)/);
    assertMatchesNative(shown, 1e-5);
  } finally {
    await run.close();
  }
});

test("?backend=webgpu computes the probe on WebGPU with the adapter's own limits", async () => {
  const run = await openPage(origin, "?backend=webgpu");
  try {
    const { backend, shown } = await finish(run, "webgpu");
    assert.equal(backend, "webgpu", await run.page.textContent("#engine"));
    assertMatchesNative(shown, 1e-3);
    const limits = await run.page.$$eval("#limits tr[data-limit]", (rows) => rows.map((row) => ({ ...row.dataset })));
    assert.ok(limits.some((l) => l.limit === "maxStorageBufferBindingSize"));
    for (const { limit, device, adapter } of limits) assert.equal(device, adapter, limit);
    assert.ok(await run.page.isVisible("#engine-adapter"));
    // f16 weights exactly when the adapter offers shader-f16.
    const f16 = await run.page.evaluate(async () => (await navigator.gpu.requestAdapter({ powerPreference: "high-performance" })).features.has("shader-f16"));
    assert.match(await run.page.textContent("#engine-precision"), f16 ? /kept in f16 .*shader-f16/ : /widened to f32 \(this GPU offers no shader-f16\)/);
  } finally {
    await run.close();
  }
});

test("by default the page picks WebGPU when the browser offers an adapter", async () => {
  const run = await openPage(origin, "");
  try {
    const hasAdapter = await run.page.evaluate(async () => !!(await navigator.gpu?.requestAdapter()));
    const { backend, shown } = await finish(run, "auto");
    assert.equal(backend, hasAdapter ? "webgpu" : "cpu");
    assertMatchesNative(shown, 1e-3);
  } finally {
    await run.close();
  }
});

test("without a WebGPU adapter the page falls back to the CPU and says why", async () => {
  const run = await openPage(origin, "", { webgpu: false });
  try {
    const { backend, reason, shown } = await finish(run, "no-webgpu");
    assert.equal(backend, "cpu");
    assert.match(reason, /no adapter|no WebGPU/);
    assertMatchesNative(shown, 1e-5);
  } finally {
    await run.close();
  }
});

test("if WebGPU fails, the page starts over on the CPU and says why", async () => {
  const workerPrelude =
    "GPUAdapter.prototype.requestDevice = () => Promise.reject(new Error('injected device failure'));\n";
  const run = await openPage(origin, "?backend=webgpu", { workerPrelude });
  try {
    const { backend, reason, shown } = await finish(run, "webgpu-failed");
    assert.equal(backend, "cpu");
    assert.match(reason, /WebGPU failed.*injected device failure/);
    assertMatchesNative(shown, 1e-5);
  } finally {
    await run.close();
  }
});
