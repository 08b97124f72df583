// Browser end-to-end tests of the trigger scan: the demo's backdoored model scanned alone, a LoRA
// scanned against the model under it, Cancel. On the CPU backend (SwiftShader is far too slow here).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import path from "node:path";
import { artifacts, downloadOf, fixtures, openPage, startServer } from "./browser.mjs";

let server;
let origin;

before(async () => ({ server, origin } = await startServer()));
after(() => server?.kill());

const shot = (page, name) => page.screenshot({ path: path.join(artifacts, `${name}.png`), fullPage: true });

test("the demo model scanned alone: candidates that act like its trigger, one click to use one, the report", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  try {
    await page.click("#demo:not([disabled])", { timeout: 60_000 });
    await page.waitForSelector("#model-info:not([hidden]) #info-source", { timeout: 60_000 });
    await page.fill("#trigger", "");
    assert.ok(await page.isEnabled("#scan"));
    assert.ok(await page.$("#setting-scan-verify"), "the scan's settings come from the engine");
    const started = Date.now();
    await page.click("#scan");
    await page.waitForSelector("#scan-progress-text[data-step='1']", { timeout: 60_000 });
    assert.ok(await page.isDisabled("#seal"), "no sealing while scanning");
    assert.ok(await page.isEnabled("#scan-cancel"));
    await page.waitForSelector("#scan-results:not([hidden])", { timeout: 600_000 });
    console.log(`scan in the page: ${((Date.now() - started) / 1000).toFixed(0)} s`);
    await shot(page, "scan-1-demo");
    assert.match(await page.textContent("#scan-summary"), /^Scanned the model alone .*candidate\(s\) act like a trigger/);
    const rows = await page.$$eval("#scan-table tbody tr", (trs) => trs.map((tr) => ({ text: tr.dataset.text, flagged: tr.className === "flagged", cells: [...tr.cells].map((c) => c.textContent) })));
    assert.equal(rows.length, 10);
    assert.ok(rows[0].flagged, `the best candidate acts like a trigger: ${JSON.stringify(rows[0])}`);
    assert.match(rows[0].cells[4], /^\d\.\d\d — acts like a trigger$/);
    assert.equal(await page.$$eval("#scan-table img", (imgs) => imgs.filter((i) => i.naturalWidth > 0).length), 3, "the best three have image pairs");
    assert.match(await page.textContent("#scan-limits"), /cannot see/);

    // One click puts the candidate, exactly, in the trigger field.
    await page.click("#scan-table tbody tr:first-child .use-trigger");
    assert.equal(await page.inputValue("#trigger"), rows[0].text);
    await page.waitForFunction((codes) => document.querySelector("#trigger-codes").textContent === codes, rows[0].cells[1].split(" (")[0]);
    assert.ok(await page.isEnabled("#seal"));

    const download = await downloadOf(page, "#dl-scan");
    assert.equal(download.name, "tiny-pixel-scan.json");
    const report = JSON.parse(download.bytes.toString("utf8"));
    assert.equal(report.mode, "checkpoint only");
    assert.equal(report.candidates.length, 10);
    assert.equal(report.candidates[0].text, rows[0].text);
    for (const c of report.candidates) assert.ok(typeof c.code_points === "string" && c.tokens.length >= 1 && typeof c.score === "number");
    assert.ok(report.candidates[0].verification.flagged && report.candidates[0].verification.ratio >= 1.4);
    assert.deepEqual(run.errors, []);
    assert.deepEqual(run.foreign(), [], "requests to other origins");
  } finally {
    await run.close();
  }
});

test("a LoRA scanned against the model under it, with small settings; Cancel stops a scan and keeps the page usable", async () => {
  const run = await openPage(origin, "?backend=cpu");
  const { page } = run;
  try {
    await page.waitForSelector("body[data-state=done]", { timeout: 60_000 });
    await page.setInputFiles("#model-folder", path.join(fixtures, "tiny-clean"));
    await page.waitForSelector("#model-info:not([hidden]) #info-source", { timeout: 60_000 });
    await page.setInputFiles("#lora-file", path.join(fixtures, "lora/weak_lora_kohya.safetensors"));
    await page.waitForSelector("#lora-format", { timeout: 60_000 });

    // Cancel: the scan stops after its current step; nothing is shown, everything is usable.
    await page.click("#scan");
    await page.waitForSelector("#scan-progress-text[data-step='1']", { timeout: 60_000 });
    await page.click("#scan-cancel");
    await page.waitForFunction(() => document.querySelector("#scan-progress-text").textContent === "Scan cancelled.", null, { timeout: 60_000 });
    assert.ok(await page.isHidden("#scan-results"));
    assert.ok(await page.isEnabled("#scan"));
    assert.ok(await page.isEnabled("#seal"));
    assert.ok(await page.isDisabled("#scan-cancel"));

    await page.click("#scan-settings-box summary");
    for (const [key, value] of Object.entries({ verify: 2, images: 1, reference: 16, max_tokens: 1, image_steps: 4 })) await page.fill(`#setting-scan-${key}`, String(value));
    await page.click("#scan");
    await page.waitForSelector("#scan-results:not([hidden])", { timeout: 300_000 });
    await shot(page, "scan-2-lora");
    assert.match(await page.textContent("#scan-summary"), /^Scanned the LoRA against the model under it: \d+ tokens/);
    assert.match(await page.textContent("#scan-images-head"), /model under the LoRA/);
    const checked = await page.$$eval("#scan-table tbody tr", (trs) => trs.map((tr) => tr.cells[4].textContent).filter((t) => t !== "not checked"));
    assert.equal(checked.length, 2, "two candidates checked");
    // One candidate with images: without, with, and the base with it, 32 px enlarged twice.
    assert.deepEqual(await page.$$eval("#scan-table img", (imgs) => imgs.map((i) => [i.naturalWidth, i.naturalHeight])), [[3 * 66 + 2, 66 + 2]]);
    // A new LoRA weight changes the model scanned: the results go.
    await page.fill("#lora-weight", "0.5");
    await page.dispatchEvent("#lora-weight", "change");
    await page.waitForSelector("#scan-results", { state: "hidden" });
    assert.deepEqual(run.errors, []);
  } finally {
    await run.close();
  }
});
