// Shared by the browser tests: the page's server and a Chromium page that records every request.
import { spawn } from "node:child_process";
import { mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
export const artifacts = path.join(root, "test-artifacts");
export const fixtures = path.resolve(root, "../shared/fixtures");
const CHROMIUM_ARGS = ["--no-sandbox", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
// Headless Chromium exposes its SwiftShader WebGPU adapter only with this flag (TOOLCHAIN.md §4).
const WEBGPU = "--enable-unsafe-webgpu";

// Clicks a button at the end of the page. Playwright's click after a full-page screenshot of a
// tall page can land outside the button (seen with Chromium 156), so the button is clicked by script.
export const clickEnd = (page, selector) => page.$eval(selector, (button) => button.click());

// A safetensors file's header: {tensors: {name: {dtype, shape}}, metadata}.
export function safetensorsHeader(bytes) {
  const length = Number(bytes.readBigUInt64LE(0));
  const { __metadata__: metadata, ...tensors } = JSON.parse(bytes.subarray(8, 8 + length).toString("utf8"));
  return { tensors, metadata };
}

// What clicking `button` downloads: {name, bytes}.
export async function downloadOf(page, button) {
  const [download] = await Promise.all([page.waitForEvent("download"), clickEnd(page, button)]);
  return { name: download.suggestedFilename(), bytes: readFileSync(await download.path()) };
}

// Starts web/serve.py on a free port; resolves to {server, origin}.
export async function startServer() {
  mkdirSync(artifacts, { recursive: true });
  const server = spawn("python3", ["web/serve.py", "--port", "0"], { cwd: root, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  server.stderr.on("data", (chunk) => (log += chunk));
  const origin = await new Promise((resolve, reject) => {
    server.stdout.once("data", (chunk) => resolve(new URL(String(chunk).match(/http:\S+/)[0]).origin));
    server.once("exit", (code) => reject(new Error(`web/serve.py exited with ${code}:\n${log}`)));
  });
  return { server, origin };
}

// Opens the page in a fresh browser profile, records every request (the page's and the worker's:
// routing is per context) and blocks any that leave the local server. `workerPrelude` is code
// prepended to web/worker.js, to inject faults. `foreign()` lists requests to other origins.
export async function openPage(origin, query, { webgpu = true, workerPrelude = "" } = {}) {
  const profile = mkdtempSync(path.join(tmpdir(), "seal-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: "/usr/bin/chromium",
    headless: true,
    acceptDownloads: true,
    viewport: { width: 1100, height: 900 },
    args: webgpu ? [...CHROMIUM_ARGS, WEBGPU] : CHROMIUM_ARGS,
  });
  const requests = new Set();
  context.on("request", (request) => requests.add(request.url()));
  await context.route("**/*", async (route) => {
    const url = route.request().url();
    requests.add(url);
    if (!url.startsWith(`${origin}/`)) return route.abort("blockedbyclient");
    if (workerPrelude && url === `${origin}/web/worker.js`) {
      const response = await route.fetch();
      return route.fulfill({ response, body: workerPrelude + (await response.text()) });
    }
    return route.continue();
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const errors = [];
  page.on("pageerror", (error) => errors.push(String(error)));
  const response = await page.goto(`${origin}/${query}`);
  const foreign = () => [...requests].filter((url) => !url.startsWith(`${origin}/`) && !/^(data|blob):/.test(url));
  const close = async () => {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  };
  return { page, response, requests, errors, foreign, close };
}
