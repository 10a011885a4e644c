// The page of `lookalike serve`, driven in Debian's chromium by playwright-core.
//
// Usage: node page.test.mjs LOOKALIKE_BINARY SAMPLE_DIR FIGURES_DIR
// Builds a database from the Fashion-MNIST sample with the binary, serves it on a free port,
// and walks through every view as a person would: upload an image, read the grid, click a hit,
// page through a label, look at duplicates, train for one epoch and watch the curve reach the
// switch. Saves a screenshot per view in FIGURES_DIR. Exits non-zero on the first failure.
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readdirSync, rmSync, copyFileSync, mkdirSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [binary, sample, figures] = process.argv.slice(2);
if (!binary || !sample || !figures) {
  console.error("usage: node page.test.mjs LOOKALIKE_BINARY SAMPLE_DIR FIGURES_DIR");
  process.exit(2);
}
mkdirSync(figures, { recursive: true });

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
  console.log(`ok - ${what}`);
}

const freePort = () => new Promise((resolve, reject) => {
  const s = createServer();
  s.on("error", reject);
  s.listen(0, "127.0.0.1", () => {
    const { port } = s.address();
    s.close(() => resolve(port));
  });
});

const dir = mkdtempSync(join(tmpdir(), "lookalike-page-"));
const db = join(dir, "page.db");
let server;
let browser;
try {
  // The fixture: 300 labelled images, plus one stored twice (a duplicate group).
  execFileSync(binary, ["add", db, sample, "--folder-labels"], { stdio: "inherit" });
  const bagDir = join(sample, "bag");
  const bag = join(bagDir, readdirSync(bagDir).filter((f) => f.endsWith(".png")).sort()[0]);
  const copy = join(dir, "bag-copy.png");
  copyFileSync(bag, copy);
  execFileSync(binary, ["add", db, copy, "--label", "bag", "--allow-duplicates"], { stdio: "inherit" });

  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  server = spawn(binary, ["serve", db, "--addr", `127.0.0.1:${port}`], { stdio: ["ignore", "inherit", "inherit"] });
  for (let i = 0; ; i++) {
    try {
      if ((await fetch(`${base}/api/stats`)).ok) break;
    } catch { /* not up yet */ }
    if (i > 100) throw new Error("the server did not come up in 10 s");
    await new Promise((r) => setTimeout(r, 100));
  }

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
  });
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));

  // 1. Search by upload.
  await page.goto(`${base}/?view=search`);
  await page.setInputFiles("#file", bag);
  await page.waitForSelector("#hits li");
  const hits = await page.$$eval("#hits li", (lis) => lis.map((li) => ({
    id: Number(li.dataset.id),
    label: li.querySelector(".label").textContent,
    distance: Number(li.querySelector(".distance").textContent.replace("distance ", "")),
  })));
  check(hits.length === 12, `the grid shows k = 12 hits (got ${hits.length})`);
  check(hits.every((h, i) => i === 0 || h.distance >= hits[i - 1].distance), "hits are best first");
  check(hits[0].distance === 0 && hits[0].label === "bag", "the nearest is the uploaded bag itself");
  check(hits[1].distance === 0, "its stored copy comes next");
  check(hits.filter((h) => h.label === "bag").length >= 6, "most hits of a bag are bags");
  check(new URL(page.url()).searchParams.get("upload")?.length === 64, "the address names the upload");
  await page.screenshot({ path: join(figures, "serve-search.png"), fullPage: true });

  // The address reloads to the same result.
  const uploadUrl = page.url();
  await page.reload();
  await page.waitForSelector("#hits li");
  check((await page.$$("#hits li")).length === 12, "reloading the address shows the result again");

  // 2. Click a hit: search by it.
  const target = hits[2].id;
  await page.click(`#hits li[data-id="${target}"] a`);
  await page.waitForFunction((id) => new URLSearchParams(location.search).get("id") === String(id), target);
  await page.waitForFunction((id) => document.querySelector("#hits li") &&
    !document.querySelector(`#hits li[data-id="${id}"]`), target);
  const byId = await page.$$eval("#hits li", (lis) => lis.map((li) => Number(li.dataset.id)));
  check(byId.length === 12 && !byId.includes(target), "clicking a hit searches by it (and leaves it out)");

  // Keyboard: Tab to the first hit and press Enter.
  await page.goto(uploadUrl);
  await page.waitForSelector("#hits li");
  await page.focus("#hits li:first-child a");
  await page.keyboard.press("Tab");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => new URLSearchParams(location.search).get("id") !== null);
  check(true, "a hit is reachable and opened with the keyboard");

  // 3. Labels: the sidebar pages through a label.
  const labels = await page.$$eval("#labels li", (lis) => lis.map((li) => li.textContent));
  check(labels.length === 10, `the sidebar lists 10 labels (got ${labels.length})`);
  check(labels.some((l) => l === "bag31"), "with their counts (bag: 31)");
  await page.click("#labels a:has-text('sneaker')");
  await page.waitForFunction(() => document.querySelector("#browse-title").textContent === "Label sneaker");
  await page.waitForSelector("#browse li");
  const browsed = await page.$$eval("#browse .label", (ls) => ls.map((l) => l.textContent));
  check(browsed.length === 30 && browsed.every((l) => l === "sneaker"), "the label's 30 images, all sneakers");
  await page.screenshot({ path: join(figures, "serve-browse.png"), fullPage: true });

  // 4. Duplicates: the stored copy and its original side by side.
  await page.click("nav a[data-view='duplicates']");
  await page.waitForSelector("#groups ol li");
  const group = await page.$$eval("#groups ol:first-child li", (lis) => lis.map((li) => li.querySelector(".label").textContent));
  check(group.length === 2 && group.every((l) => l === "bag"), "the duplicate pair is one group");
  await page.screenshot({ path: join(figures, "serve-duplicates.png"), fullPage: true });

  // 5. Models and training: one epoch, the curve updates, the switch is reported.
  await page.click("nav a[data-view='models']");
  await page.waitForSelector("#models tbody tr");
  check((await page.$$("#models tbody tr")).length === 1, "one model before training");
  await page.selectOption("#train-extractor", "simnet");
  await page.fill("#train-config", "cpu-gray");
  await page.fill("#train-epochs", "1");
  await page.selectOption("#train-activate", "always");
  await page.click("#train-start");
  await page.waitForFunction(() => document.querySelectorAll("#curve circle").length >= 1, null, { timeout: 120000 });
  check(true, "the curve shows the evaluation before training");
  await page.waitForFunction(() => document.querySelector("#train-status").dataset.state, null, { timeout: 300000 });
  const state = await page.$eval("#train-status", (s) => [s.dataset.state, s.textContent]);
  check(state[0] === "done", `the job ended and switched: ${state[1]}`);
  check(/activated as asked/.test(state[1]), "the status says the new model is active, and why");
  check((await page.$$("#curve circle")).length === 2, "the curve has the points before and after the epoch");
  await page.waitForFunction(() => document.querySelectorAll("#models tbody tr").length === 2);
  check(await page.$eval("#models tr.active td", (td) => td.textContent) === "v2", "v2 is marked active");
  check(/model v2 simnet/.test(await page.textContent("#summary")), "the header names the new model");
  await page.screenshot({ path: join(figures, "serve-models.png"), fullPage: true });

  // 6. Phone width.
  const phone = await browser.newPage({ viewport: { width: 390, height: 844 }, isMobile: true });
  await phone.goto(uploadUrl);
  await phone.waitForSelector("#hits li");
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  check(overflow <= 0, `nothing wider than a phone (overflow ${overflow} px)`);
  await phone.screenshot({ path: join(figures, "serve-phone.png"), fullPage: false });

  check(errors.length === 0, `no script errors (${errors.join("; ")})`);
  console.log("browser test passed");
} finally {
  if (browser) await browser.close();
  if (server) server.kill("SIGTERM");
  rmSync(dir, { recursive: true, force: true });
}
