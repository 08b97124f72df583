// A model of real size in the page: a BK-SDM-tiny folder with random weights (f16, ~1 GiB, made
// by `seal random-model` from ../shared/fixtures/layouts into a temporary folder) loads on the CPU
// engine a tensor at a time, within the memory plan, and seals one 128-px step.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { artifacts, fixtures, openPage, root, startServer } from "./browser.mjs";

const GiB = 1024 ** 3;
const seal = process.env.SEAL_BIN ?? path.join(process.env.SEAL_CACHE ?? path.join(process.env.HOME, ".cache/seal"), "target/debug/seal");
let server;
let origin;
let folder;

before(async () => {
  ({ server, origin } = await startServer());
  folder = mkdtempSync(path.join(tmpdir(), "seal-bk-sdm-tiny-"));
  execFileSync(seal, ["random-model", "--unet", "bk_sdm_tiny", "--layouts", path.join(fixtures, "layouts"), "--out", folder], { cwd: root, stdio: "inherit" });
});
after(() => {
  server?.kill();
  if (folder) rmSync(folder, { recursive: true, force: true });
});

test("a BK-SDM-tiny-sized folder loads on the CPU engine within 2.4 GiB of wasm heap and seals a 128-px step", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  try {
    await page.waitForSelector("body[data-state=done]", { timeout: 60_000 });
    const started = Date.now();
    await page.setInputFiles("#model-folder", folder);
    await page.waitForSelector("#model-info:not([hidden]) #info-architecture", { timeout: 600_000 });
    const loadSeconds = (Date.now() - started) / 1000;
    assert.match(await page.textContent("#info-architecture"), /BK-SDM tiny/);
    assert.equal(await page.textContent("#info-dtype"), "f16");
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
