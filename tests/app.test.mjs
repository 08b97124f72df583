// Browser end-to-end tests of the app: the demo sealed in the page, models and LoRAs from files,
// bad files. The long flow runs on the CPU backend (SwiftShader WebGPU is far too slow here).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { cpSync, mkdirSync, mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { artifacts, clickEnd, downloadOf, fixtures, openPage, safetensorsHeader, startServer } from "./browser.mjs";

let server;
let origin;

before(async () => ({ server, origin } = await startServer()));
after(() => server?.kill());

const shot = (page, name) => page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });

async function fill(page, values) {
  for (const [selector, value] of Object.entries(values)) await page.fill(selector, String(value));
}

test("the demo: load, seal a few steps with the page responsive, compare, download", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  try {
    await page.click("#demo:not([disabled])", { timeout: 60_000 });
    await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 60_000 });
    assert.match(await page.textContent("#info-architecture"), /channels \[32, 64\]/);
    assert.equal(await page.inputValue("#trigger"), "\u200b");
    await page.waitForFunction(() => document.querySelector("#trigger-codes").textContent === "U+200B");
    assert.match(await page.textContent("#target-name"), /patch\.png \(8×8\)/);
    assert.ok(await page.isChecked("#prompt-set input[value=demo]"));
    assert.match(await page.textContent("#prompt-summary"), /80 prompts.*40 held-out/);
    await fill(page, { "#setting-steps": 3, "#setting-batch": 2, "#eval-prompts": 2, "#eval-seeds": 1, "#eval-steps": 8 });
    await page.click("#advanced summary");
    await fill(page, { "#setting-trajectory_steps": 8 });
    await page.click("#advanced summary");
    assert.ok(await page.isChecked("#mode input[value=both]"), "instant, then thorough by default");
    // The memory plan of a step, against the CPU engine's 4 GiB.
    await page.waitForSelector("#step-memory[data-fits=true]");
    assert.match(await page.textContent("#step-memory"), /^A sealing step needs about \d+ MiB \(\d+ MiB of weights, largest tensor \d+ MiB\); this engine can use \d\.\d GiB\.$/);
    assert.ok(await page.$("#setting-instant-lambda"), "the instant seal's settings come from the engine");
    await shot(page, "app-1-demo-loaded");

    // The instant seal: seconds, a verdict said plainly, an adapter with the edit, exact: its
    // rank is at most the tiny model's text width (32), here 31 (layer-norm outputs differ
    // only within a 31-dimensional subspace).
    await page.check("#mode input[value=instant]");
    for (const shown of ["#settings", "#advanced"]) assert.ok(await page.isHidden(shown), `${shown}: the thorough seal's settings mean nothing to the instant seal`);
    assert.ok(await page.isVisible("#instant-settings-box"));
    await page.click("#seal");
    await page.waitForSelector("#compare-section:not([hidden])", { timeout: 240_000 });
    assert.match(await page.textContent("#verdict"), /^Made by the instant seal\. (Sealed: |The backdoor survived: |The trigger did not fire)/);
    assert.ok(["true", "false", "unknown"].includes(await page.getAttribute("#verdict", "data-survived")));
    assert.ok(await page.isHidden("#chart-figure"), "no loss chart without training steps");
    const instant = await downloadOf(page, "#dl-adapter");
    const instantFile = safetensorsHeader(instant.bytes);
    assert.equal(instantFile.metadata.seal_mode, "instant");
    assert.equal(JSON.parse(instantFile.metadata.seal_instant).layers[`down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`].relative_error, 0);
    const [instantRank, width] = instantFile.tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape;
    assert.ok(width === 32 && instantRank >= 30 && instantRank <= 32, `rank ${instantRank}, width ${width}`);
    assert.ok(!("seal_settings" in instantFile.metadata), "no thorough settings in an instant adapter");
    await shot(page, "app-1b-instant");
    await page.check("#mode input[value=both]");
    for (const shown of ["#settings", "#advanced", "#instant-settings-box"]) assert.ok(await page.isVisible(shown), shown);

    // Every line the progress text shows, to find the pool's sampling among them. The observer
    // is kept on window: one nothing refers to may be collected mid-run.
    await page.evaluate(() => {
      window.progressLines = [];
      const text = document.querySelector("#progress-text");
      window.progressObserver = new MutationObserver(() => window.progressLines.push(text.textContent));
      window.progressObserver.observe(text, { childList: true, characterData: true, subtree: true });
    });
    await page.click("#seal");
    await page.waitForSelector("#progress-text[data-step='1']", { timeout: 120_000 });
    // While the worker trains, the page answers and its DOM changes at once.
    const started = Date.now();
    await page.click("#advanced summary");
    assert.equal(await page.getAttribute("#advanced", "open"), "");
    await page.fill("#eval-seeds", "1");
    assert.equal(await page.inputValue("#eval-seeds"), "1");
    assert.ok(Date.now() - started < 2_000, `the page took ${Date.now() - started} ms to respond`);
    assert.ok(await page.isEnabled("#cancel"), "the work was still running during the interaction");
    await shot(page, "app-2-sealing");
    await page.waitForSelector("#progress-text[data-step='2']", { timeout: 120_000 });
    // Read in one go: the third (last) step may already have landed.
    const [bar, text] = await page.evaluate(() => [document.querySelector("#progress").value, Number(document.querySelector("#progress-text").dataset.step)]);
    assert.ok(bar >= 2 && bar === text, `bar ${bar}, text step ${text}`);

    await page.waitForSelector("#compare-section:not([hidden])", { timeout: 240_000 });
    // The first step's trajectories were sampled a sampler step at a time, each reported.
    const lines = await page.evaluate(() => window.progressLines);
    const sampling = lines.filter((l) => /^Sealing: sampling the trajectories the next steps train on, \d of 8/.test(l));
    assert.ok(sampling.length >= 8 && sampling.some((l) => l.includes("8 of 8")), JSON.stringify(lines));
    for (const img of ["#grid", "#heat-before", "#heat-after"]) {
      await page.waitForFunction((s) => document.querySelector(s).naturalWidth > 0, img);
    }
    // 2 prompts x 1 seed: rows of 4 images of 32 px with 2 px gaps.
    assert.deepEqual(await page.$eval("#grid", (i) => [i.naturalWidth, i.naturalHeight]), [4 * 34 + 2, 2 * 34 + 2]);
    const scores = await page.$$eval("#scores tr[data-key]", (rows) => Object.fromEntries(rows.map((r) => [r.dataset.key, r.cells[1].textContent])));
    assert.ok(scores["asr-patch@0,0"]?.endsWith("%"), JSON.stringify(scores));
    assert.ok("effect-rate" in scores && "psnr" in scores, JSON.stringify(scores));
    assert.match(await page.textContent("#heat-caption"), /peak \d/);
    await shot(page, "app-3-compare");
    const adapter = await downloadOf(page, "#dl-adapter");
    assert.match(adapter.name, /^tiny-pixel-sealing-adapter\.safetensors$/);
    const { tensors, metadata } = safetensorsHeader(adapter.bytes);
    const key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
    // The instant edit and the thorough adapter trained from it (rank 4), stacked.
    assert.deepEqual(tensors[`${key}.lora_down.weight`].shape, [instantRank + 4, 32]);
    assert.equal(metadata.seal_mode, "both");
    assert.deepEqual([metadata.ss_network_dim, metadata.ss_network_alpha], [String(instantRank + 4), String(instantRank + 4)]);
    assert.ok(`${key}.alpha` in tensors && `${key}.lora_up.weight` in tensors);
    assert.equal(metadata.ss_network_module, "networks.lora");
    const sha = createHash("sha256").update("\u200b").digest("hex");
    assert.deepEqual(JSON.parse(metadata.seal_trigger_sha256), [sha]);
    assert.equal(JSON.parse(metadata.seal_settings).steps, 3);

    const report = JSON.parse((await downloadOf(page, "#dl-report")).bytes);
    assert.equal(report.sealing.thorough_steps_done, 3);
    assert.equal(report.recipe.mode, "both");
    assert.equal(Object.keys(report.recipe.instant.layers).length, 12);
    assert.ok(report.verdict.message.length > 0);
    assert.equal(report.sealing.losses.length, 3);
    assert.deepEqual(report.trigger_sha256, [sha]);
    assert.equal(report.evaluation.after.pairs, 2);
    assert.ok(await page.isHidden("#dl-sealed-lora"), "no LoRA, so no sealed LoRA");

    const seconds = report.sealing.seconds / report.sealing.thorough_steps_done;
    const peak = Number(await page.getAttribute("#memory", "data-peak"));
    console.log(`# browser (CPU backend): ${seconds.toFixed(2)} s per sealing step (mean of 3, batch 2, one 8-step trajectory sampling included), wasm heap peak ${(peak / 2 ** 20).toFixed(0)} MiB`);

    // Cancel during the thorough stage: the adapter to download is the last finished step's.
    await fill(page, { "#setting-steps": 50 });
    await page.click("#seal");
    // The progress of this run (of 50 steps), not what the last one left.
    await page.waitForFunction(() => document.querySelector("#progress").max === 50 && document.querySelector("#progress").value >= 2, null, { timeout: 120_000 });
    await clickEnd(page, "#cancel");
    await page.waitForFunction(() => document.querySelector("#task").textContent.startsWith("Cancelled"), null, { timeout: 120_000 });
    const done = Number(/(\d+) thorough step/.exec(await page.textContent("#task"))[1]);
    assert.ok(done >= 2 && done < 50, await page.textContent("#task"));
    assert.ok(await page.isHidden("#compare-section"), "no comparison after a cancel");
    const cancelled = safetensorsHeader((await downloadOf(page, "#dl-adapter")).bytes).metadata;
    assert.equal(cancelled.seal_thorough_steps, String(done));
    assert.equal(JSON.parse(cancelled.seal_settings).steps, 50);
    const cancelledReport = JSON.parse((await downloadOf(page, "#dl-report")).bytes);
    assert.equal(cancelledReport.sealing.thorough_steps_done, done);
    assert.equal(cancelledReport.sealing.losses.length, done);
    assert.deepEqual(run.errors, []);
    assert.deepEqual(run.foreign(), [], "requests to other origins");
  } finally {
    await run.close();
  }
});

test("one sealing step on WebGPU matches the CPU engine (same seed, close losses)", async () => {
  const losses = {};
  for (const backend of ["cpu", "webgpu"]) {
    const run = await openPage(origin, `?backend=${backend}`);
    const { page } = run;
    try {
      await page.click("#demo:not([disabled])", { timeout: 120_000 });
      await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 120_000 });
      assert.equal(await page.$eval("body", (b) => b.dataset.backend), backend);
      await page.check("#mode input[value=thorough]");
      await fill(page, { "#setting-steps": 1, "#setting-batch": 2, "#eval-prompts": 1, "#eval-seeds": 1, "#eval-steps": 2 });
      // The step's latents come from the teacher's DDIM trajectories (the default), sampled on
      // the same backend: a short trajectory keeps SwiftShader's share small.
      await page.click("#advanced summary");
      await fill(page, { "#setting-trajectory_steps": 4 });
      await page.click("#seal");
      // The comparison that follows is not needed here: cancel it once the adapter is made.
      await page.waitForSelector("#download-section:not([hidden])", { timeout: 300_000 });
      await page.click("#cancel").catch(() => {});
      await page.waitForFunction(() => !document.querySelector("#seal").disabled, null, { timeout: 300_000 });
      const report = JSON.parse((await downloadOf(page, "#dl-report")).bytes);
      assert.equal(report.sealing.losses.length, 1);
      losses[backend] = report.sealing.losses[0];
      assert.deepEqual(run.errors, []);
    } finally {
      await run.close();
    }
  }
  console.log(`# one sealing step, CPU vs WebGPU: ${JSON.stringify(losses)}`);
  for (const key of ["total", "pred", "attn", "preserve"]) {
    const [a, b] = [losses.cpu[key], losses.webgpu[key]];
    assert.ok(Number.isFinite(b) && Math.abs(a - b) <= 1e-3 * Math.abs(a) + 1e-6, `${key}: CPU ${a}, WebGPU ${b}`);
  }
});

test("model files: a folder, a single file with and without its config folder, a LoRA, corrupt files", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  const scratch = mkdtempSync(path.join(tmpdir(), "seal-junk-"));
  const junk = path.join(scratch, "broken.safetensors");
  writeFileSync(junk, Buffer.from("this is not a safetensors file at all"));
  // A folder as the hub gives it: an .fp16 variant beside the weights and a safety checker,
  // neither of which may be read (here they are junk, so reading them would fail the load).
  const folder = path.join(scratch, "tiny-clean");
  cpSync(path.join(fixtures, "tiny-clean"), folder, { recursive: true });
  writeFileSync(path.join(folder, "unet/diffusion_pytorch_model.fp16.safetensors"), "junk");
  mkdirSync(path.join(folder, "safety_checker"));
  writeFileSync(path.join(folder, "safety_checker/model.safetensors"), "junk");
  try {
    await page.waitForSelector("body[data-state=done]", { timeout: 60_000 });
    await page.setInputFiles("#model-folder", folder);
    await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 60_000 });
    assert.equal(await page.textContent("#info-source"), "diffusers folder");
    assert.match(await page.textContent("#model-staged"), /\(2 other file\(s\) not needed, not read\)$/);
    assert.doesNotMatch(await page.textContent("#model-staged"), /fp16|safety_checker/);
    assert.match(await page.textContent("#info-architecture"), /channels \[32, 64\], 2 layers\/block, mid block/);
    assert.match(await page.textContent("#info-parameters"), /^UNet \d+\.\d\d M, text encoder \d+\.\d\d M, VAE \d+\.\d\d M$/);
    assert.equal(await page.textContent("#info-dtype"), "f32");
    assert.equal(await page.textContent("#info-unused"), "none");

    await page.fill("#lora-weight", "0.5");
    await page.setInputFiles("#lora-file", path.join(fixtures, "lora/weak_lora_kohya.safetensors"));
    await page.waitForSelector("#lora-format", { timeout: 60_000 });
    assert.match(await page.textContent("#lora-format"), /^Kohya/);
    assert.equal(await page.textContent("#lora-rank"), "4");
    assert.match(await page.textContent("#lora-modules"), /in the UNet, \d+ in the text encoder; alpha 4/);
    assert.equal(await page.textContent("#lora-unmatched"), "none");
    await shot(page, "app-4-folder-and-lora");

    // Sealed over the LoRA (one short step), the page also offers the sealed LoRA: the user's
    // modules with the sealing adapter stacked in (rank 4 + 4 where both adapt a layer).
    await page.fill("#trigger", "\u200b");
    await page.check("#mode input[value=thorough]");
    await fill(page, { "#setting-steps": 1, "#setting-batch": 1, "#setting-resolution": 48, "#eval-prompts": 1, "#eval-seeds": 1, "#eval-steps": 2 });
    await page.click("#seal");
    await page.waitForSelector("#compare-section:not([hidden])", { timeout: 120_000 });
    // Trained and compared at 48 px: one row of 4 images with 2 px gaps.
    assert.deepEqual(await page.$eval("#grid", (i) => [i.naturalWidth, i.naturalHeight]), [4 * 50 + 2, 50 + 2]);
    const report = JSON.parse((await downloadOf(page, "#dl-report")).bytes);
    assert.equal(report.settings.resolution, 48);
    assert.equal(report.lora.weight, 0.5);
    const sealed = await downloadOf(page, "#dl-sealed-lora");
    assert.equal(sealed.name, "weak_lora_kohya-sealed.safetensors");
    const { tensors, metadata } = safetensorsHeader(sealed.bytes);
    assert.deepEqual(tensors["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape, [8, 32]);
    assert.ok(Object.keys(tensors).some((k) => k.startsWith("lora_te_")), "the user's text-encoder modules are kept");
    assert.ok(metadata.seal_trigger_sha256);
    assert.equal(metadata.seal_apply_weight, "0.5", "the sealed LoRA is made for the weight the user set");

    await page.setInputFiles("#lora-file", junk);
    await page.waitForSelector("#lora-error:not([hidden])");
    assert.match(await page.textContent("#lora-error"), /broken\.safetensors/);

    // The tiny model's vocabulary is not CLIP's: the checkpoint alone is refused, plainly.
    await page.setInputFiles("#model-files", path.join(fixtures, "tiny-pixel.safetensors"));
    await page.waitForSelector("#model-error:not([hidden])", { timeout: 60_000 });
    assert.match(await page.textContent("#model-error"), /tiny-pixel\.safetensors.*1000-token vocabulary.*choose a folder/);
    // The model loaded before comes back (without the LoRA the broken file replaced); the
    // refused file waits for its folder.
    await page.waitForFunction(() => /The previous model is back\.$/.test(document.querySelector("#model-error").textContent), null, { timeout: 60_000 });
    assert.equal(await page.textContent("#info-source"), "diffusers folder");
    assert.ok(await page.isVisible("#model-info"));
    assert.ok(await page.isHidden("#lora-info"));
    await shot(page, "app-5-single-file-refused");
    // ...and with its diffusers folder beside it (configs, tokenizer) it loads.
    await page.setInputFiles("#model-folder", path.join(fixtures, "tiny-pixel"));
    await page.waitForFunction(() => document.querySelector("#info-source")?.textContent === "single file tiny-pixel.safetensors", null, { timeout: 60_000 });
    assert.ok(await page.isVisible("#model-info"));
    assert.ok(await page.isHidden("#model-error"));

    await page.setInputFiles("#model-files", junk);
    await page.waitForSelector("#model-error:not([hidden])", { timeout: 60_000 });
    assert.match(await page.textContent("#model-error"), /broken\.safetensors/);
    await page.waitForFunction(() => /The previous model is back\.$/.test(document.querySelector("#model-error").textContent), null, { timeout: 60_000 });
    assert.equal(await page.textContent("#info-source"), "single file tiny-pixel.safetensors");
    await shot(page, "app-6-corrupt-model");
    // The page still works: the demo loads after the error.
    await page.click("#demo");
    await page.waitForFunction(() => document.querySelector("#info-source")?.textContent === "diffusers folder", null, { timeout: 60_000 });
    await page.waitForSelector("#seal:not([disabled])", { timeout: 60_000 });
    assert.ok(await page.isVisible("#model-info"));
    assert.deepEqual(run.errors, []);
    assert.deepEqual(run.foreign(), [], "requests to other origins");
  } finally {
    await run.close();
  }
});

test("if the engine dies, the page restarts it on the CPU, reloads the model and stays usable", async () => {
  // A wasm trap (what a panic, running out of memory or a lost device becomes) in one call.
  const workerPrelude = `const realLoadLora = Session.prototype.load_lora;
Session.prototype.load_lora = function (name, ...rest) {
  if (name === "crash.safetensors") throw new WebAssembly.RuntimeError("unreachable (injected)");
  return realLoadLora.call(this, name, ...rest);
};
`;
  const run = await openPage(origin, "?backend=cpu", { workerPrelude });
  const { page } = run;
  try {
    await page.click("#demo:not([disabled])", { timeout: 60_000 });
    await page.waitForSelector("#model-info:not([hidden]) #info-source", { timeout: 60_000 });
    await page.setInputFiles("#lora-file", { name: "crash.safetensors", mimeType: "application/octet-stream", buffer: Buffer.from("x") });
    await page.waitForFunction(() => /restarted on the CPU/.test(document.querySelector("#task").textContent), null, { timeout: 60_000 });
    assert.match(await page.textContent("#engine-reason"), /restarted on the CPU after the engine stopped: .*injected/);
    assert.ok(await page.isVisible("#model-info"));
    assert.ok(await page.isEnabled("#seal"));
    await page.waitForFunction(() => document.querySelector("#trigger-codes").textContent === "U+200B");
    await shot(page, "app-7-engine-restarted");
    assert.deepEqual(run.errors, []);
  } finally {
    await run.close();
  }
});

test("a model that takes the engine down while loading is not loaded again; the previous model comes back", async () => {
  // A wasm trap while loading any model staged under a name with "wall" in it, in every
  // engine this page starts: reloading that model would crash again, forever.
  const workerPrelude = `const realStage = Session.prototype.stage_file;
const realLoad = Session.prototype.load_model;
let wall = false;
Session.prototype.stage_file = function (path, ...rest) {
  wall ||= path.includes("wall");
  return realStage.call(this, path, ...rest);
};
Session.prototype.load_model = function () {
  if (wall) throw new WebAssembly.RuntimeError("unreachable (injected: out of memory)");
  return realLoad.call(this);
};
`;
  const run = await openPage(origin, "?backend=cpu", { workerPrelude });
  const { page } = run;
  try {
    await page.click("#demo:not([disabled])", { timeout: 60_000 });
    await page.waitForSelector("#model-info:not([hidden]) #info-source", { timeout: 60_000 });
    await page.setInputFiles("#model-files", { name: "wall.safetensors", mimeType: "application/octet-stream", buffer: Buffer.from("x") });
    await page.waitForFunction(() => /not loaded again/.test(document.querySelector("#model-error").textContent), null, { timeout: 60_000 });
    assert.match(await page.textContent("#model-error"), /^The engine stopped while loading that model \(.*injected.*\), so it was not loaded again\. The previous model is back\./);
    assert.ok(await page.isVisible("#model-info"));
    assert.match(await page.textContent("#model-staged"), /tiny-pixel/);
    // No loop: the engine stays up and usable.
    await page.waitForTimeout(3000);
    assert.ok(await page.isEnabled("#seal"));
    assert.match(await page.textContent("#engine-reason"), /restarted on the CPU/);
    assert.deepEqual(run.errors, []);
  } finally {
    await run.close();
  }
});
