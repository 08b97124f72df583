// Models of real size in the page, with random weights (f16, made by `seal random-model` from
// ../shared/fixtures/layouts into temporary folders, once per run). On the CPU engine, which
// keeps them in f16: BK-SDM-tiny (~1 GiB) loads a tensor at a time within the memory plan and
// seals one 128-px step; SD 1.5 (~2 GiB) loads whole, takes a rank-16 kohya LoRA, seals
// instantly, and its slow comparison answers Cancel. On WebGPU SD 1.5 loads whole with the LoRA
// while the wasm heap stays small.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { artifacts, downloadOf, fixtures, openPage, root, safetensorsHeader, startServer } from "./browser.mjs";

const GiB = 1024 ** 3;
const seal = process.env.SEAL_BIN ?? path.join(process.env.SEAL_CACHE ?? path.join(process.env.HOME, ".cache/seal"), "target/debug/seal");
let server;
let origin;
let scratch;
let bkTiny;
let sd15;

before(async () => {
  ({ server, origin } = await startServer());
  scratch = mkdtempSync(path.join(tmpdir(), "seal-real-size-"));
  const make = (unet, ...extra) => {
    const out = path.join(scratch, unet);
    execFileSync(seal, ["random-model", "--unet", unet, "--layouts", path.join(fixtures, "layouts"), "--out", out, ...extra], { cwd: root, stdio: "inherit" });
    return out;
  };
  bkTiny = make("bk_sdm_tiny");
  sd15 = make("sd15", "--lora-rank", "16");
});
after(() => {
  server?.kill();
  if (scratch) rmSync(scratch, { recursive: true, force: true });
});

test("a BK-SDM-tiny-sized folder loads on the CPU engine within 2.4 GiB of wasm heap and seals a 128-px step", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  try {
    await page.waitForSelector("body[data-state=done]", { timeout: 60_000 });
    const started = Date.now();
    await page.setInputFiles("#model-folder", bkTiny);
    await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 600_000 });
    const loadSeconds = (Date.now() - started) / 1000;
    assert.match(await page.textContent("#info-architecture"), /BK-SDM tiny/);
    assert.equal(await page.textContent("#info-dtype"), "f16, kept in f16");
    const loaded = Number(await page.getAttribute("#memory", "data-peak"));
    console.log(`BK-SDM-tiny (1011 MiB f16) on the CPU engine: loaded in ${loadSeconds.toFixed(0)} s, wasm heap peak ${(loaded / GiB).toFixed(2)} GiB`);
    assert.ok(loaded <= 2.4 * GiB, `wasm heap ${(loaded / GiB).toFixed(2)} GiB after loading`);

    // One thorough step at 128 px on noise latents, then the smallest comparison.
    await page.check("#mode input[value=thorough]");
    await page.fill("#setting-steps", "1");
    await page.fill("#setting-batch", "1");
    await page.fill("#setting-resolution", "128");
    await page.click("#advanced summary");
    await page.selectOption("#setting-latents", "noise");
    for (const [id, value] of [["#eval-prompts", 1], ["#eval-seeds", 1], ["#eval-steps", 2]]) await page.fill(id, String(value));
    await page.uncheck("#eval-effect");
    await page.fill("#trigger", "cf");
    // A step too large for the tab is refused before any work, with a size to try.
    await page.fill("#setting-resolution", "512");
    await page.fill("#setting-batch", "8");
    // The plan follows each edit; wait for the one made with both.
    await page.waitForFunction(() => /at 512 px, batch 8/.test(document.querySelector("#step-memory").textContent));
    assert.equal(await page.getAttribute("#step-memory", "data-fits"), "false");
    assert.match(await page.textContent("#step-memory"), /^Too large for this engine: a sealing step at 512 px, batch 8 needs about \d+\.\d GiB .*: try /);
    await page.click("#seal");
    await page.waitForSelector("#seal-error:not([hidden])");
    assert.match(await page.textContent("#seal-error"), /needs about .* more than the .* GiB this engine can use/);
    await page.fill("#setting-resolution", "128");
    await page.fill("#setting-batch", "1");
    // Beside 1 GiB of f16 weights, a 128-px step fits with the text encoder's adapters (the default).
    await page.waitForFunction(() => /at 128 px, batch 1/.test(document.querySelector("#step-memory").textContent) || document.querySelector("#step-memory").dataset.fits === "true");
    assert.equal(await page.getAttribute("#step-memory", "data-fits"), "true", await page.textContent("#step-memory"));
    assert.ok(await page.isChecked("#setting-text_encoder"));
    console.log(`plan for one 128-px step: ${await page.textContent("#step-memory")}`);
    const sealing = Date.now();
    await page.click("#seal");
    await page.waitForSelector("#compare-section:not([hidden])", { timeout: 900_000 });
    const sealed = Number(await page.getAttribute("#memory", "data-peak"));
    console.log(`one 128-px sealing step and the comparison: ${((Date.now() - sealing) / 1000).toFixed(0)} s, wasm heap peak ${(sealed / GiB).toFixed(2)} GiB`);
    assert.match(await page.textContent("#task"), /compared|sealed|survived/);
    await page.screenshot({ path: path.join(artifacts, "real-size-bk-sdm-tiny.png"), fullPage: true });
    assert.deepEqual(run.errors, []);
  } finally {
    await run.close();
  }
});

test("SD 1.5 (2 GiB f16) loads whole on the CPU engine in f16, takes a rank-16 kohya LoRA, seals instantly, and its comparison answers Cancel", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  try {
    await page.waitForSelector("body[data-state=done]", { timeout: 60_000 });
    await page.fill("#trigger", "cf");
    await page.waitForSelector("#memory[data-peak]");
    const started = Date.now();
    await page.setInputFiles("#model-folder", sd15);
    await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 600_000 });
    const loadSeconds = (Date.now() - started) / 1000;
    // Kept in f16 (2.0 GiB), the whole model fits the tab's wasm memory, which its f32 weights (4.0 GiB) would not.
    assert.equal(await page.textContent("#info-dtype"), "f16, kept in f16");
    assert.ok(await page.isHidden("#info-partial"), "loaded whole");
    assert.match(await page.textContent("#task"), /the instant seal is selected/);
    assert.ok(await page.isChecked("#mode input[value=instant]"));
    const loaded = Number(await page.getAttribute("#memory", "data-peak"));
    assert.ok(loaded <= 2.6 * GiB, `wasm heap ${(loaded / GiB).toFixed(2)} GiB after loading`);
    await page.setInputFiles("#lora-file", path.join(sd15, "lora-rank16.safetensors"));
    await page.waitForSelector("#lora-rank", { timeout: 300_000 });

    await page.check("#prompt-set input[value=custom]");
    await page.fill("#custom-prompts", ["a photo of a dog", "a red car in the rain", "a bowl of fruit", "a mountain lake at dawn"].join("\n"));
    await page.waitForFunction(() => /^4 prompt\(s\)/.test(document.querySelector("#prompt-summary").textContent));
    for (const [id, value] of [["#eval-prompts", 1], ["#eval-seeds", 1], ["#eval-steps", 2]]) await page.fill(id, String(value));
    await page.uncheck("#eval-effect");
    const sealing = Date.now();
    await page.click("#seal");
    await page.waitForSelector("#download-section:not([hidden])", { timeout: 600_000 });
    const sealSeconds = (Date.now() - sealing) / 1000;
    // The comparison runs a sampler step or an image's decoding at a time (1 pair, clean and
    // triggered: per model 2 sampler steps and 2 decodings), so Cancel is answered after the
    // step in progress, not after whole samplings.
    await page.waitForFunction(() => /^Comparing before and after: step 0 of 8$/.test(document.querySelector("#progress-text").textContent), null, { timeout: 60_000 });
    const cancelling = Date.now();
    await page.click("#cancel");
    await page.waitForFunction(() => document.querySelector("#task").textContent.startsWith("Comparison cancelled"), null, { timeout: 900_000 });
    const cancelSeconds = (Date.now() - cancelling) / 1000;
    const adapter = safetensorsHeader((await downloadOf(page, "#dl-adapter")).bytes);
    assert.equal(adapter.metadata.seal_mode, "instant");
    const layers = Object.keys(adapter.tensors).filter((k) => k.endsWith(".lora_down.weight"));
    assert.equal(layers.length, 32, "SD 1.5 has 16 cross-attentions, each with a key and a value projection");
    assert.ok(layers.every((k) => /_attn2_to_[kv]\.lora_down\.weight$/.test(k)), layers.join(", "));
    // The user's LoRA with the seal stacked in: its own rank-16 layers, the K/V ones grown by the edit's rank.
    const sealedLora = safetensorsHeader((await downloadOf(page, "#dl-sealed-lora")).bytes);
    const rank = (file, layer) => file.tensors[`${layer}.lora_down.weight`]?.shape[0];
    const kv = layers[0].replace(".lora_down.weight", "");
    assert.equal(rank(sealedLora, kv), 16 + rank(adapter, kv));
    const peak = Number(await page.getAttribute("#memory", "data-peak"));
    console.log(`SD 1.5 (2034 MiB f16) on the CPU engine in f16: loaded in ${loadSeconds.toFixed(0)} s, wasm heap ${(loaded / GiB).toFixed(2)} GiB; ` +
      `LoRA and instant seal of 4 prompts ${sealSeconds.toFixed(0)} s; comparison cancelled during its first step, answered in ${cancelSeconds.toFixed(0)} s; heap peak ${(peak / GiB).toFixed(2)} GiB`);
    assert.ok(peak <= 3.5 * GiB, `wasm heap peak ${(peak / GiB).toFixed(2)} GiB`);
    await page.screenshot({ path: path.join(artifacts, "real-size-sd15-cpu-instant.png"), fullPage: true });
    assert.deepEqual(run.errors, []);
  } finally {
    await run.close();
  }
});

test("SD 1.5 (2 GiB f16) and a rank-16 kohya LoRA load on WebGPU with the wasm heap under 256 MiB", async () => {
  const run = await openPage(origin, "?backend=webgpu");
  const { page } = run;
  try {
    await page.waitForSelector("body[data-state=done]", { timeout: 120_000 });
    assert.equal(await page.textContent("#engine-backend"), "WebGPU (Burn wgpu)");
    // Any call reports the heap: describing a trigger is one.
    await page.fill("#trigger", "cf");
    await page.waitForSelector("#memory[data-peak]");
    const before = Number(await page.getAttribute("#memory", "data-peak"));
    const started = Date.now();
    await page.setInputFiles("#model-folder", sd15);
    await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 600_000 });
    const loadSeconds = (Date.now() - started) / 1000;
    assert.match(await page.textContent("#info-architecture"), /SD 1\.x/);
    // Kept in f16 exactly where the engine computes in f16 (a GPU with shader-f16).
    const f16 = /kept in f16/.test(await page.textContent("#engine-precision"));
    assert.equal(await page.textContent("#info-dtype"), f16 ? "f16, kept in f16" : "f16, widened to f32 on this engine");
    const loaded = Number(await page.getAttribute("#memory", "data-peak"));
    await page.setInputFiles("#lora-file", path.join(sd15, "lora-rank16.safetensors"));
    await page.waitForSelector("#lora-rank", { timeout: 300_000 });
    assert.equal(await page.textContent("#lora-rank"), "16");
    const peak = Number(await page.getAttribute("#memory", "data-peak"));
    console.log(`SD 1.5 (2034 MiB f16) on WebGPU: loaded in ${loadSeconds.toFixed(0)} s, wasm heap peak ${(loaded / 2 ** 20).toFixed(0)} MiB after the model, ${(peak / 2 ** 20).toFixed(0)} MiB after the LoRA (${(before / 2 ** 20).toFixed(0)} MiB before)`);
    assert.ok(peak - before <= 256 * 2 ** 20, `the wasm heap grew by ${((peak - before) / 2 ** 20).toFixed(0)} MiB`);
    assert.deepEqual(run.errors, []);
  } finally {
    await run.close();
  }
});
