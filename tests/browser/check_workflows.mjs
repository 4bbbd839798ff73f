// Drives the real ComfyUI frontend (served by a live ComfyUI server) in Debian's headless Chromium with playwright-core:
// for each workflow file it loads the graph the way the frontend loads a dropped/opened file (app.loadGraphData),
// checks for the missing-nodes dialog and for nodes the graph could not create, takes screenshots, clicks the real
// Queue button and records the /api/prompt response. Started by tests/browser/run_browser_check.py, which owns the
// server; this script only talks to it over HTTP.
//
//   node tests/browser/check_workflows.mjs --url http://127.0.0.1:PORT --out DIR --workflow a.json [--workflow b.json]
//        [--control c.json]   (a workflow that MUST be reported as having missing nodes: proves the check can fail)
//
// Prints one JSON object (the results) on the last line of stdout.

import { createRequire } from "node:module";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..");
const BROWSER_DIR = process.env.TDM_BROWSER_DIR || path.join(REPO, ".browser");
const require = createRequire(path.join(BROWSER_DIR, "package.json"));
const { chromium } = require("playwright-core");

function parseArgs(argv) {
  const args = { workflows: [], controls: [], queue: true };
  for (let i = 0; i < argv.length; i++) {
    const key = argv[i];
    if (key === "--url") args.url = argv[++i];
    else if (key === "--out") args.out = argv[++i];
    else if (key === "--workflow") args.workflows.push(argv[++i]);
    else if (key === "--control") args.controls.push(argv[++i]);
    else if (key === "--no-queue") args.queue = false;
    else if (key === "--report") args.report = argv[++i];
    else if (key === "--jobs") args.jobs = argv[++i];
    else if (key === "--badge") args.badge = argv[++i];
    else if (key === "--fold") args.fold = argv[++i];
    else throw new Error(`unknown argument ${key}`);
  }
  if (!args.url || !args.out) throw new Error("--url and --out are required");
  return args;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (...parts) => console.error("[browser]", ...parts);

// In the page: the frontend's open dialogs (its pinia dialog store, with the DOM as a cross-check) and the graph's
// nodes that failed to be created (unregistered types get a placeholder node with has_errors set).
function inspectPage(expectedTypes) {
  const vueApp = document.querySelector("#vue-app")?.__vue_app__;
  const pinia = vueApp?.config?.globalProperties?.$pinia;
  const dialogStore = pinia?._s?.get("dialog");
  const storeDialogs = (dialogStore?.dialogStack ?? []).filter((d) => d.visible).map((d) => d.key);
  const domDialogs = [...document.querySelectorAll(".p-dialog")]
    .filter((el) => el.offsetParent !== null || el.getClientRects().length > 0)
    .map((el) => el.innerText.replace(/\s+/g, " ").trim().slice(0, 300));
  const registered = window.LiteGraph?.registered_node_types ?? null;
  const nodes = window.app.graph.nodes.map((n) => ({
    id: n.id,
    type: n.type,
    has_errors: !!n.has_errors,
    registered: registered ? n.type in registered : null,
  }));
  const bad = nodes.filter((n) => n.has_errors || n.registered === false || !expectedTypes.includes(n.type));
  // Toasts: the frontend's schema validation of a loaded workflow reports there ("Invalid workflow against zod
  // schema"), as do other load-time warnings.
  const toasts = [...document.querySelectorAll(".p-toast-message")].map((el) => ({
    severity: ["error", "warn", "info", "success", "secondary", "contrast"]
      .find((s) => el.classList.contains(`p-toast-message-${s}`)) ?? "unknown",
    text: el.innerText.replace(/\s+/g, " ").trim().slice(0, 300),
  }));
  // Newer frontends (1.49) report missing node types in a notification of their own ("Missing node: <type>. This
  // workflow uses a custom node that isn't installed."), not a PrimeVue toast: found by its text.
  const missingNodesNotice = /\bmissing nodes?\b/i.test(document.body.innerText);
  return {
    toasts,
    missingNodesNotice,
    dialogStoreFound: !!dialogStore,
    storeDialogs,
    domDialogs,
    nodeCount: nodes.length,
    badNodes: bad,
  };
}

// In the page, right after loading with the workflow's saved view, at the user's default settings:
// - the frontend draws node text at the saved zoom: LiteGraph drops to its low-quality drawing (no titles, labels or
//   widget values) below min_font_size_for_lod / (NODE_TEXT_SIZE · sqrt(devicePixelRatio)); checked for a 1× screen,
//   the common and the strictest case (this browser renders at 2× for sharper thumbnails);
// - the Read me and every loader (what a user fills in first) lie whole inside the window, not under the toolbar or
//   sidebar (the canvas itself must be the element at its title and at its corners): live boxes (LiteGraph's
//   boundingRect, title bar included, with the sizes the frontend computed);
// - no two node boxes intersect, and no link runs under a node (see the end).
function inspectLayout() {
  const { canvas, graph } = window.app;
  const canvasElement = canvas.canvas;
  const problems = [];
  const textSize = window.LiteGraph?.NODE_TEXT_SIZE ?? 14;
  const lod = canvas.min_font_size_for_lod;
  if (typeof lod !== "number") {
    problems.push("this frontend exposes no canvas.min_font_size_for_lod: the readability check cannot run");
  } else if (lod > 0 && canvas.ds.scale < lod / textSize) {
    problems.push(`the saved zoom ${canvas.ds.scale} is below ${(lod / textSize).toFixed(3)}, where the frontend's ` +
                  `default level of detail (${lod} px) stops drawing node text on a 1× screen`);
  } else if (lod === 0) {
    problems.push("LiteGraph.Canvas.MinFontSizeForLOD is 0 here: the check must run with the user's default settings");
  }
  const boxes = graph.nodes.map((node) => {
    const [x, y, w, h] = node.boundingRect;
    const [left, top] = canvas.ds.convertOffsetToCanvas([x, y]);
    const [right, bottom] = canvas.ds.convertOffsetToCanvas([x + w, y + h]);
    const rect = canvasElement.getBoundingClientRect();
    return { id: node.id, type: node.type, title: node.title, x, y, w, h,
             screen: [left + rect.left, top + rect.top, right + rect.left, bottom + rect.top] };
  });
  const visibleAt = (px, py) => {
    if (px < 0 || py < 0 || px >= window.innerWidth || py >= window.innerHeight) return false;
    const hit = document.elementFromPoint(px, py);
    return hit === canvasElement || canvasElement.contains(hit) ||
      // DOM widgets (text areas, the note's markdown) sit over the canvas inside their node: still the node
      !!hit?.closest?.(".dom-widget, .comfy-markdown, .comfy-multiline-input, .p-panel, .lg-node");
  };
  const mustShow = (box) => box.type === "MarkdownNote" || box.type.includes("Loader");
  for (const box of boxes.filter(mustShow)) {
    const [l, t, r, b] = box.screen;
    const inset = 3;
    const points = [[(l + r) / 2, t + 12], [l + inset, t + inset], [r - inset, t + inset], [l + inset, b - inset],
                    [r - inset, b - inset]];
    const hidden = points.filter(([px, py]) => !visibleAt(px, py));
    if (hidden.length) {
      problems.push(`node ${box.id} ${box.type} ("${box.title}") is not fully on screen at the saved view: ` +
                    `screen box ${[l, t, r, b].map(Math.round)} in a ${window.innerWidth}×${window.innerHeight} window`);
    }
  }
  for (let i = 0; i < boxes.length; i++) {
    for (let j = i + 1; j < boxes.length; j++) {
      const a = boxes[i], b = boxes[j];
      if (a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h) {
        problems.push(`nodes ${a.id} ${a.type} and ${b.id} ${b.type} overlap (live sizes ${a.w}×${a.h}, ${b.w}×${b.h})`);
      }
    }
  }
  // No link drawn under a node (links are drawn before the nodes, so one that crosses a node is hidden and seems
  // wired to it): each link as the frontend draws it by default (a spline that leaves its output rightwards and
  // enters its input from the left, a quarter of its length out; the same geometry as tdm_devkit.workflow_build
  // .links_under_nodes), from the live slot positions, against every live node box; its own two nodes only beyond
  // the slot strip it attaches at.
  const links = graph.links instanceof Map ? [...graph.links.values()] : Object.values(graph.links ?? {});
  const byId = new Map(boxes.map((box) => [box.id, box]));
  for (const link of links) {
    const source = graph.getNodeById(link.origin_id), target = graph.getNodeById(link.target_id);
    if (!source || !target) continue;
    const a = source.getConnectionPos(false, link.origin_slot), b = target.getConnectionPos(true, link.target_slot);
    const reach = 0.25 * Math.hypot(b[0] - a[0], b[1] - a[1]);
    const c1 = [a[0] + reach, a[1]], c2 = [b[0] - reach, b[1]];
    const under = new Set();
    for (let i = 0; i <= 48; i++) {
      const t = i / 48, u = 1 - t;
      const px = u * u * u * a[0] + 3 * u * u * t * c1[0] + 3 * u * t * t * c2[0] + t * t * t * b[0];
      const py = u * u * u * a[1] + 3 * u * u * t * c1[1] + 3 * u * t * t * c2[1] + t * t * t * b[1];
      for (const box of boxes) {
        let [left, right] = [box.x, box.x + box.w];
        if (box.id === link.origin_id) right -= 20;
        if (box.id === link.target_id) left += 20;
        if (px > left - 4 && px < right + 4 && py > box.y - 4 && py < box.y + box.h + 4) under.add(box.id);
      }
    }
    for (const id of under) {
      problems.push(`the link ${source.type} → ${target.type} runs under node ${id} ${byId.get(id).type}`);
    }
  }
  return { problems, boxes: boxes.map(({ id, type, x, y, w, h }) => ({ id, type, x, y, w, h })) };
}

async function closeDialogs(page) {
  for (let i = 0; i < 5; i++) {
    const open = await page.evaluate(() => {
      const store = document.querySelector("#vue-app")?.__vue_app__?.config?.globalProperties?.$pinia?._s?.get("dialog");
      const stack = (store?.dialogStack ?? []).filter((d) => d.visible);
      for (const dialog of stack) store.closeDialog({ key: dialog.key });
      return stack.length + document.querySelectorAll(".p-dialog").length;
    });
    if (!open) return;
    await page.keyboard.press("Escape");
    await sleep(200);
  }
}

async function closeToasts(page) {
  for (let i = 0; i < 10; i++) {
    const button = page.locator(".p-toast-message .p-toast-close-button").first();
    if (!(await button.count())) return;
    await button.click({ timeout: 2000 }).catch(() => {});
    await sleep(150);
  }
}

async function waitForIdleQueue(page, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const queue = await page.evaluate(async () => (await fetch("/api/queue")).json());
    if (!queue.queue_running.length && !queue.queue_pending.length) return true;
    await sleep(250);
  }
  return false;
}

async function checkOne(page, file, { control, queue, out }) {
  const name = path.basename(file, ".json");
  const graph = JSON.parse(readFileSync(file, "utf8"));
  const expectedTypes = await page.evaluate(async () => Object.keys(await (await fetch("/api/object_info")).json()));
  const result = { name, file, control, screenshot: null, canvas: null };

  await closeDialogs(page);
  await closeToasts(page);
  const started = Date.now();
  // What the frontend does with a dropped or opened .json workflow (app.handleFile -> loadGraphData), with the file's
  // name so the tab is titled like a user's.
  await page.evaluate(async ({ graph, name }) => {
    await window.app.loadGraphData(graph, true, true, name);
  }, { graph, name });
  await sleep(1000); // the missing-nodes dialog opens asynchronously after configure
  await page.waitForFunction(() => window.app.graph.nodes.length > 0, null, { timeout: 10000 });
  Object.assign(result, await page.evaluate(inspectPage, [...expectedTypes, "Note", "MarkdownNote"]));
  result.loadMs = Date.now() - started;
  if (!control) {
    // the pointer may still rest on the Run button of the previous check, whose tooltip would cover a node
    await page.mouse.move(640, 900);
    await sleep(400);
    const layout = await page.evaluate(inspectLayout);
    result.layoutProblems = layout.problems;
    result.liveBoxes = layout.boxes;
  }
  result.jsonNodeCount = graph.nodes.length;
  result.missingNodesDialog =
    result.storeDialogs.includes("global-missing-nodes") || result.domDialogs.some((t) => /missing nodes/i.test(t));
  // Newer frontends (1.49) report missing node types in a notification instead of a dialog.
  result.missingNodesToast = result.missingNodesNotice && !result.missingNodesDialog;
  result.anyDialog = result.storeDialogs.length > 0 || result.domDialogs.length > 0;
  // The page as the user sees it right after loading (any dialog or alert included).
  result.screenshot = path.join(out, `${name}.png`);
  await page.screenshot({ path: result.screenshot });

  // Thumbnail source: the graph alone, fitted to the view, UI chrome hidden (focus mode), clipped to the nodes'
  // bounding box widened to 4:3.
  await closeDialogs(page);
  await closeToasts(page);
  await page.evaluate(async () => {
    const command = window.app.extensionManager.command;
    await command.execute("Comfy.Canvas.FitView");
    await command.execute("Workspace.ToggleFocusMode");
  });
  await sleep(600);
  const clip = await page.evaluate(() => {
    const { canvas } = window.app;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (const node of window.app.graph.nodes) {
      const [x, y, w, h] = node.boundingRect;
      [x0, y0, x1, y1] = [Math.min(x0, x), Math.min(y0, y), Math.max(x1, x + w), Math.max(y1, y + h)];
    }
    const [left, top] = canvas.ds.convertOffsetToCanvas([x0, y0]);
    const [right, bottom] = canvas.ds.convertOffsetToCanvas([x1, y1]);
    return { left, top, right, bottom, width: window.innerWidth, height: window.innerHeight };
  });
  const margin = 24;
  let w = clip.right - clip.left + 2 * margin, h = clip.bottom - clip.top + 2 * margin;
  if (w / h > 4 / 3) h = (w * 3) / 4; else w = (h * 4) / 3;
  w = Math.min(w, clip.width); h = Math.min(h, clip.height);
  const cx = (clip.left + clip.right) / 2, cy = (clip.top + clip.bottom) / 2;
  const x = Math.max(0, Math.min(clip.width - w, cx - w / 2)), y = Math.max(0, Math.min(clip.height - h, cy - h / 2));
  result.canvas = path.join(out, `${name}.canvas.png`);
  await page.screenshot({ path: result.canvas, clip: { x, y, width: w, height: h } });
  await page.evaluate(async () => window.app.extensionManager.command.execute("Workspace.ToggleFocusMode"));
  await sleep(300);

  if (queue && !control) {
    await closeDialogs(page);
    // The real Queue/Run button; its POST /api/prompt is what is recorded.
    const response = await clickQueue(page);
    result.queueStatus = response.status();
    let body = null;
    try { body = await response.json(); } catch { body = await response.text(); }
    result.promptId = body?.prompt_id ?? null;
    result.queueError = response.ok() ? null : JSON.stringify(body).slice(0, 2000);
    result.queuedNodeCount = Object.keys(JSON.parse(response.request().postData() || "{}").prompt ?? {}).length;
    await waitForIdleQueue(page, 120000);
    await sleep(500);
    result.queuedScreenshot = path.join(out, `${name}.queued.png`);
    await page.screenshot({ path: result.queuedScreenshot });
    await closeDialogs(page);
  }
  log(`${name}: ${result.nodeCount} nodes, missing-nodes dialog=${result.missingNodesDialog}, ` +
      `toast=${result.missingNodesToast}, toasts=${JSON.stringify(result.toasts).slice(0, 300)}, ` +
      `bad nodes=${result.badNodes.length}` + (result.queueStatus ? `, /api/prompt ${result.queueStatus}` : ""));
  return result;
}

// Loads a graph as the frontend loads a dropped or opened workflow file (app.loadGraphData), in a tab titled `title`.
async function loadGraph(page, graph, title, settleMs) {
  await page.evaluate(async ({ graph, title }) => { await window.app.loadGraphData(graph, true, true, title); },
                      { graph, title });
  await sleep(settleMs);
}

// Clicks the real Queue/Run button; returns the response to the POST /api/prompt it sends.
async function clickQueue(page) {
  const responsePromise = page.waitForResponse(
    (r) => r.url().endsWith("/api/prompt") && r.request().method() === "POST", { timeout: 30000 });
  await page.locator('[data-testid="queue-button"]').first().click();
  return responsePromise;
}

async function loadAndRun(page, file, timeoutMs) {
  const graph = JSON.parse(readFileSync(file, "utf8"));
  await closeDialogs(page);
  await closeToasts(page);
  await loadGraph(page, graph, "feature check", 800);
  const response = await clickQueue(page);
  await waitForIdleQueue(page, timeoutMs);
  await sleep(800);
  return response.status();
}

// A real run of TDM LoRA Loader (auto) + TDM KSampler (auto) on tiny models: the reports drawn on the nodes.
async function checkReport(page, file, out) {
  const status = await loadAndRun(page, file, 180000);
  const found = await page.evaluate(() => {
    const reports = {};
    let strengthWidget = null;
    for (const node of window.app.graph.nodes) {
      const widget = node.widgets?.find((w) => w.name === "report");
      if (widget) reports[node.type] = String(widget.value ?? "");
      if (node.type === "TDMLoraLoader") {
        const strength = node.widgets.find((w) => w.name === "strength");
        strengthWidget = { label: strength.label ?? null, disabled: !!(strength.disabled ?? strength.computedDisabled),
                           value: strength.value };
      }
    }
    const drawn = [...document.querySelectorAll(".tdm-report")].map((el) => ({
      text: el.textContent, visible: el.getClientRects().length > 0 && getComputedStyle(el).display !== "none" }));
    return { reports, strengthWidget, drawn };
  });
  await page.mouse.move(640, 900); // off the Run button: its tooltip would cover the picture
  await sleep(300);
  await page.screenshot({ path: path.join(out, "lora_report.png") });
  log(`LoRA report: HTTP ${status}, ${JSON.stringify(found).slice(0, 400)}`);
  return { status, ...found };
}

// The pack's "TDM jobs" sidebar tab (web/tdm_jobs.js): it must register and render the /tdm/jobs list; after a real
// tiny job (when given) it must show the header, the loss curve, the preview and a Remove button.
async function checkJobsPanel(page, out, jobsFile) {
  if (jobsFile) await loadAndRun(page, jobsFile, 300000);
  await closeDialogs(page);
  const registered = await page.evaluate(async () => {
    try {
      await window.app.extensionManager.command.execute("Workspace.ToggleSidebarTab.tdm-jobs");
      return true;
    } catch (error) {
      return String(error);
    }
  });
  let text = null;
  let features = {};
  try {
    await page.locator(".tdm-jobs").first().waitFor({ timeout: 15000 });
    if (jobsFile) {
      await page.locator(".tdm-job .tdm-loss-curve polyline").first().waitFor({ timeout: 20000 }).catch(() => {});
      // every job's preview (the demo runs an image job and a video job), not just the first to load
      await page.waitForFunction(() => {
        const images = [...document.querySelectorAll(".tdm-job-preview")];
        return images.length >= 2 && images.every((img) => img.complete && img.naturalWidth > 0);
      }, null, { timeout: 20000 }).catch(() => {});
    }
    await sleep(500);
    text = await page.locator(".tdm-jobs").first().textContent();
    features = await page.evaluate(() => ({
      header: !!document.querySelector(".tdm-jobs-header"),
      curve: document.querySelectorAll(".tdm-job .tdm-loss-curve polyline").length >= 2,
      preview: [...document.querySelectorAll(".tdm-job-preview")].some((img) => img.complete && img.naturalWidth > 0),
      previewSize: [...document.querySelectorAll(".tdm-job-preview")].map((img) => [img.naturalWidth, img.naturalHeight]),
      remove: !!document.querySelector(".tdm-job .tdm-job-remove"),
      states: [...document.querySelectorAll(".tdm-job")].map((el) => el.dataset.state),
    }));
  } catch (error) {
    text = null;
  }
  await page.mouse.move(640, 900);
  await sleep(300);
  await page.screenshot({ path: path.join(out, "jobs_panel.png") });
  log(`jobs panel: registered=${registered === true}, rendered=${text !== null}, ${JSON.stringify(features)}`);
  return { registered: registered === true, error: registered === true ? null : registered, text, ...features };
}

// The "TDM jobs" sidebar icon's badge (web/tdm_jobs.js): the number of active jobs, none when there are none. A real
// graph of two long tiny distillations is queued with the Queue button (one runs, one waits), then stopped one by one;
// at each stage the badge drawn in the sidebar must say what /tdm/jobs says.
const ACTIVE_STATES = ["queued", "running", "stopping"];

async function jobsNow(page) {
  return page.evaluate(async () => (await (await fetch("/tdm/jobs")).json()).jobs
    .map((j) => ({ id: j.id, name: j.name, state: j.state })));
}

async function badgeNow(page) {
  return page.evaluate(() => {
    const button = document.querySelector(".tdm-jobs-tab-button");
    // 1.32: PrimeVue OverlayBadge (.p-badge); 1.49: a span of its own (.sidebar-icon-badge)
    const badge = button?.querySelector(".p-badge, .sidebar-icon-badge");
    const shown = badge && badge.getClientRects().length > 0 && getComputedStyle(badge).display !== "none";
    return { button: !!button, badge: shown ? badge.textContent.trim() : null };
  });
}

// Waits until the badge matches the active jobs (the panel updates after the job event), then reads both.
async function badgeSettled(page, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  let seen;
  do {
    const jobs = await jobsNow(page);
    const active = jobs.filter((j) => ACTIVE_STATES.includes(j.state)).length;
    seen = { active, states: jobs.map((j) => j.state), ...(await badgeNow(page)) };
    if (seen.badge === (active ? String(active) : null)) return seen;
    await sleep(300);
  } while (Date.now() < deadline);
  return seen;
}

async function waitForJobs(page, test, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const jobs = await jobsNow(page);
    if (test(jobs)) return jobs;
    await sleep(300);
  }
  return jobsNow(page);
}

async function sidebarShot(page, file) {
  await page.mouse.move(900, 1000);
  await sleep(1000); // the tooltips of the buttons last clicked fade
  await page.screenshot({ path: file, clip: { x: 0, y: 0, width: 420, height: 560 } });
}

async function checkJobsBadge(page, out, badgeFile) {
  await closeDialogs(page);
  await closeToasts(page);
  // the panel closed: the badge must follow the jobs without it
  if (await page.locator(".tdm-jobs").first().isVisible().catch(() => false)) {
    await page.evaluate(async () => window.app.extensionManager.command.execute("Workspace.ToggleSidebarTab.tdm-jobs"));
    await sleep(300);
  }
  const result = { before: await badgeSettled(page, 5000) };
  const graph = JSON.parse(readFileSync(badgeFile, "utf8"));
  const names = graph.nodes.filter((n) => n.type === "TDMDistillStart").map((n) => n.widgets_values[3]);
  await loadGraph(page, graph, "badge check", 800);
  result.queueStatus = (await clickQueue(page)).status();
  const ours = (jobs) => jobs.filter((j) => names.includes(j.name));
  await waitForJobs(page, (jobs) => ours(jobs).filter((j) => ACTIVE_STATES.includes(j.state)).length === names.length,
                    120000);
  result.during = await badgeSettled(page, 10000);
  await sidebarShot(page, path.join(out, "badge.png"));
  // stop the waiting one first: one active job is left
  const started = ours(await jobsNow(page));
  const stopJob = (job) => page.evaluate(async (id) => (await fetch(`/tdm/jobs/${encodeURIComponent(id)}/stop`,
                                                                     { method: "POST" })).status, job.id);
  const waiting = started.find((j) => j.state === "queued") ?? started[started.length - 1];
  result.stopped = [await stopJob(waiting)];
  await waitForJobs(page, (jobs) => !ACTIVE_STATES.includes(jobs.find((j) => j.id === waiting.id)?.state), 60000);
  result.one = await badgeSettled(page, 10000);
  for (const job of started.filter((j) => j.id !== waiting.id)) result.stopped.push(await stopJob(job));
  await waitForJobs(page, (jobs) => !jobs.some((j) => ACTIVE_STATES.includes(j.state)), 120000);
  result.after = await badgeSettled(page, 10000);
  await sidebarShot(page, path.join(out, "badge_none.png"));
  await waitForIdleQueue(page, 60000);
  for (const job of started) {
    await page.evaluate(async (id) => fetch(`/tdm/jobs/${encodeURIComponent(id)}`, { method: "DELETE" }), job.id);
  }
  log(`jobs badge: before ${JSON.stringify(result.before)}, during ${JSON.stringify(result.during)}, ` +
      `one left ${JSON.stringify(result.one)}, after ${JSON.stringify(result.after)}`);
  return result;
}

// TDM Distill's advanced inputs on the standard canvas (web/tdm_advanced.js): folded when the workflow loads, shown
// after a click on the node's own toggle, folded again after a second; the saved widgets_values never change, and the
// prompt the real Queue button posts carries every input's value, the folded ones included. The workflow's advanced
// values are first set away from their defaults, so a value the server filled in would show.
async function nodeState(page) {
  return page.evaluate(async () => {
    const node = window.app.graph.nodes.find((n) => n.type === "TDMDistillStart");
    const spec = (await (await fetch("/api/object_info/TDMDistillStart")).json()).TDMDistillStart.input;
    const inputs = { ...spec.required, ...(spec.optional ?? {}) };
    const advanced = Object.keys(inputs).filter((name) => inputs[name][1]?.advanced);
    const everyday = Object.keys(inputs).filter((name) => !inputs[name][1]?.advanced);
    const byName = Object.fromEntries(node.widgets.map((w) => [w.name, w]));
    const visible = (name) => !!byName[name] && node.isWidgetVisible(byName[name]);
    const toggle = node.widgets.find((w) => w.name === "tdm_advanced_toggle");
    const canvas = window.app.canvas;
    const rect = canvas.canvas.getBoundingClientRect();
    const screen = (x, y) => {
      const [sx, sy] = canvas.ds.convertOffsetToCanvas([x, y]);
      return [sx + rect.left, sy + rect.top];
    };
    const [x, y, w, h] = node.boundingRect;
    const [left, top] = screen(x, y);
    const [right, bottom] = screen(x + w, y + h);
    const toggleAt = toggle && node.isWidgetVisible(toggle) && toggle.last_y != null
      ? screen(node.pos[0] + node.size[0] / 2, node.pos[1] + toggle.last_y + (window.LiteGraph.NODE_WIDGET_HEIGHT ?? 20) / 2)
      : null;
    return {
      vueNodesMode: !!window.LiteGraph.vueNodesMode,
      size: [...node.size],
      advancedShown: advanced.filter((name) => byName[name] && visible(name)),
      advancedHidden: advanced.filter((name) => byName[name] && !visible(name)),
      everydayHidden: everyday.filter((name) => byName[name] && !visible(name)),
      toggle: toggle ? { label: toggle.label ?? toggle.name, at: toggleAt } : null,
      widgetsValues: node.serialize().widgets_values,
      box: [left, top, right, bottom],
    };
  });
}

async function nodeShot(page, state, file) {
  await page.mouse.move(900, 1040);
  await sleep(400);
  const [l, t, r, b] = state.box;
  const x = Math.max(0, l - 12), y = Math.max(0, t - 12);
  await page.screenshot({ path: file, clip: { x, y, width: Math.min(1920 - x, r - l + 24),
                                               height: Math.min(1080 - y, b - t + 24) } });
}

async function checkAdvancedFold(page, out, foldFile) {
  await closeDialogs(page);
  await closeToasts(page);
  const graph = JSON.parse(readFileSync(foldFile, "utf8"));
  const start = graph.nodes.find((n) => n.type === "TDMDistillStart");
  const changes = { steps: 2, lora_rank: 8, learning_rate: 0.0002, batch_size: 2, keep_last: 5, preview_every: 25,
                    seed: 1234, lora_alpha: 4, unconditional_prompt: "blurry",
                    // the recipe's knobs: optional widgets after every older one
                    recipe: "official_readme", adam_beta1: 0.5, tau_density: "logit_normal", tau_logit_std: 0.5,
                    stages: "all", lr_decay: "cosine" };
  // the names of the saved widgets, in the order of widgets_values, and their defaults (a node made and thrown away)
  const { widgetNames, widgetDefaults, inputNames } = await page.evaluate(async () => {
    const info = (await (await fetch("/api/object_info/TDMDistillStart")).json()).TDMDistillStart;
    const probe = window.LiteGraph.createNode("TDMDistillStart");
    const saved = probe.widgets.filter((w) => w.serialize !== false);
    return { widgetNames: saved.map((w) => w.name), widgetDefaults: saved.map((w) => w.value),
             inputNames: [...(info.input_order?.required ?? Object.keys(info.input.required)),
                          ...(info.input_order?.optional ?? Object.keys(info.input.optional ?? {}))] };
  });
  // A workflow file leaves out trailing optional widgets it does not set (the frontend gives them their defaults and
  // saves them from then on): the values this node saves are the file's, then those defaults.
  while (start.widgets_values.length < widgetNames.length) {
    start.widgets_values.push(widgetDefaults[start.widgets_values.length]);
  }
  for (const [name, value] of Object.entries(changes)) {
    const index = widgetNames.indexOf(name);
    if (index >= 0) start.widgets_values[index] = value;
  }
  const expectedValues = [...start.widgets_values];
  await loadGraph(page, graph, "advanced inputs", 1000);
  // the node in view at zoom 1, so the toggle is clicked where a user would
  await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.type === "TDMDistillStart");
    const { ds } = window.app.canvas;
    ds.scale = 1;
    ds.offset = [-node.pos[0] + 420, -node.pos[1] + 140];
    window.app.canvas.setDirty(true, true);
  });
  await sleep(500);
  const result = { expectedValues, widgetNames, inputNames };
  result.folded = await nodeState(page);
  await nodeShot(page, result.folded, path.join(out, "distill_folded.png"));
  if (result.folded.toggle?.at) {
    await page.mouse.click(...result.folded.toggle.at);
    await sleep(600);
  }
  result.unfolded = await nodeState(page);
  await nodeShot(page, result.unfolded, path.join(out, "distill_unfolded.png"));

  // the real Queue button, with the advanced inputs shown and then folded again
  const queue = async () => {
    const response = await clickQueue(page);
    const posted = JSON.parse(response.request().postData() || "{}").prompt ?? {};
    const entry = Object.values(posted).find((n) => n.class_type === "TDMDistillStart");
    await waitForIdleQueue(page, 60000);
    await sleep(500);
    // the run fails at the stand-in checkpoint: the frontend's error dialog must not cover the node
    await closeDialogs(page);
    await closeToasts(page);
    return { status: response.status(), inputs: entry?.inputs ?? null };
  };
  result.queuedUnfolded = await queue();
  // shown, the node may reach below the window (TDM Distill: ~1100 px at zoom 1): scroll its toggle into view, as a
  // user would, before clicking it
  await page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.type === "TDMDistillStart");
    const { ds } = window.app.canvas;
    ds.offset = [ds.offset[0], Math.min(ds.offset[1], 1080 - 160 - node.pos[1] - node.size[1])];
    window.app.canvas.setDirty(true, true);
  });
  await sleep(500);
  const shown = await nodeState(page);
  if (shown.toggle?.at) {
    await page.mouse.click(...shown.toggle.at);
    await sleep(600);
  }
  result.refolded = await nodeState(page);
  result.queuedFolded = await queue();
  await closeDialogs(page);
  await closeToasts(page);
  log(`advanced inputs: folded ${result.folded.advancedHidden.length} hidden / ${result.folded.advancedShown.length} ` +
      `shown, size ${result.folded.size}; after the toggle ${result.unfolded.advancedShown.length} shown, size ` +
      `${result.unfolded.size}; folded again size ${result.refolded.size}; /api/prompt ` +
      `${result.queuedUnfolded.status}/${result.queuedFolded.status}`);
  return result;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const profile = mkdtempSync(path.join(tmpdir(), "tdm-chromium-"));
  // A fresh profile each run (playwright passes it to Chromium as --user-data-dir).
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.TDM_CHROMIUM || "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1920, height: 1080 }, // the window of the issue that found the unreadable zooms
    deviceScaleFactor: 2, // a sharper canvas for the thumbnails
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
  const results = { pageErrors: [], workflows: [] };
  try {
    const page = context.pages()[0] ?? await context.newPage();
    // A returning user who has dismissed the "Nodes 2.0" banner (it would cover the top of every screenshot).
    await page.addInitScript(() => localStorage.setItem("vueNodesBannerDismissed", "true"));
    page.on("pageerror", (e) => results.pageErrors.push(String(e).slice(0, 500)));
    const started = Date.now();
    await page.goto(args.url, { waitUntil: "domcontentloaded", timeout: 120000 });
    await page.waitForFunction(() => window.app?.graph && window.app?.extensionManager?.command, null,
                               { timeout: 120000 });
    await page.locator('[data-testid="queue-button"]').first().waitFor({ timeout: 60000 });
    results.frontendVersion = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
    results.startupMs = Date.now() - started;
    log(`frontend ready in ${results.startupMs} ms`);
    await sleep(1000);
    await closeDialogs(page);
    for (const file of args.workflows) {
      results.workflows.push(await checkOne(page, file, { control: false, queue: args.queue, out: args.out }));
    }
    for (const file of args.controls) {
      results.workflows.push(await checkOne(page, file, { control: true, queue: false, out: args.out }));
    }
    if (args.report) results.loraReport = await checkReport(page, args.report, args.out);
    results.jobsPanel = await checkJobsPanel(page, args.out, args.jobs);
    if (args.fold) results.advancedFold = await checkAdvancedFold(page, args.out, args.fold);
    if (args.badge) results.jobsBadge = await checkJobsBadge(page, args.out, args.badge);
  } finally {
    await context.close();
    rmSync(profile, { recursive: true, force: true });
  }
  console.log(JSON.stringify(results));
}

main().catch((error) => {
  console.error(error);
  process.exit(2);
});
