// TDM distillation jobs panel: a sidebar tab listing the background jobs of comfyui-tdm with live progress
// (websocket events tdm.job.*), each job's loss curve (GET /tdm/jobs/<id> history) and latest student preview
// (GET /tdm/jobs/<id>/preview.png), Stop / Resume (POST /tdm/jobs/<id>/stop|resume) and Remove for jobs that are
// over (DELETE /tdm/jobs/<id>: the record and checkpoints go, the LoRA files stay). Errors appear in ComfyUI's toast.
// The tab's icon carries a badge with the number of active jobs (queued, running or stopping), none when there are none.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ACTIVE = new Set(["queued", "running", "stopping"]);
const REMOVABLE = new Set(["finished", "failed", "stopped"]);
const STATE_COLORS = {
  queued: "#b0a24a", running: "#4a90d9", stopping: "#c78a3b", stopped: "#888", failed: "#d9534f", finished: "#4caf50",
};
const SVG = "http://www.w3.org/2000/svg";
// The same colours as TDM Distill Status's curve image (nodes/distill_images.py LOSS_COLOURS; a test holds them together).
const LOSS_COLOURS = { "fake score": "#e8a33d", generator: "#5fa8e8" };

function notify(severity, detail) {
  const toast = app.extensionManager?.toast;
  if (toast?.add) toast.add({ severity, summary: "TDM jobs", detail, life: severity === "error" ? 8000 : 5000 });
  else console[severity === "error" ? "error" : "log"]("[TDM jobs]", detail);
}

function formatEta(seconds) {
  if (seconds == null || !isFinite(seconds)) return "";
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m > 0 ? `${m} min ${s} s` : `${s} s`;
}

function element(tag, css, text) {
  const el = document.createElement(tag);
  if (css) el.style.cssText = css;
  if (text != null) el.textContent = text;
  return el;
}

// The job's message without the queue position the server wrote when it was queued: that goes stale as jobs ahead
// finish, so the panel states the current one itself (queueLine).
function freshMessage(job) {
  return (job.message || "").replace(/\s*\(waits for job [^)]*\)/, "");
}

function queueLine(job, jobs) {
  if (job.state !== "queued") return "";
  const ahead = jobs.filter((j) => ACTIVE.has(j.state) && j.id !== job.id && (j.state !== "queued" || j.created < job.created));
  if (!ahead.length) return "starts next";
  const running = ahead.find((j) => j.state !== "queued");
  return `${ahead.length} job${ahead.length > 1 ? "s" : ""} ahead` + (running ? ` (training now: ${running.name})` : "");
}

// Fake-score and generator losses over the steps, as a small SVG line chart (log scale when they span decades).
function lossCurve(history) {
  const width = 260, height = 90, pad = 4;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height + 14}`);
  svg.setAttribute("class", "tdm-loss-curve");
  svg.style.cssText = "width:100%;max-width:420px;background:#202020;border-radius:4px;margin-top:6px;";
  const points = history.filter((p) => p.every((v) => isFinite(v)));
  if (points.length < 2) {
    const text = document.createElementNS(SVG, "text");
    text.setAttribute("x", 8); text.setAttribute("y", 20); text.setAttribute("fill", "#aaa");
    text.setAttribute("font-size", "10");
    text.textContent = "loss curve: after the first steps";
    svg.appendChild(text);
    return svg;
  }
  const values = points.flatMap((p) => [p[1], p[2]]);
  const positive = values.every((v) => v > 0);
  const useLog = positive && Math.max(...values) / Math.min(...values) > 30;
  const f = useLog ? Math.log10 : (v) => v;
  const ys = values.map(f);
  const yMin = Math.min(...ys), yMax = Math.max(...ys) || yMin + 1;
  const xMin = points[0][0], xMax = points[points.length - 1][0] || xMin + 1;
  const x = (step) => pad + ((step - xMin) / Math.max(1, xMax - xMin)) * (width - 2 * pad);
  const y = (v) => pad + (1 - (f(v) - yMin) / Math.max(1e-12, yMax - yMin)) * (height - 2 * pad);
  for (const [index, label] of [[1, "fake score"], [2, "generator"]]) {
    const color = LOSS_COLOURS[label];
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.map((p) => `${x(p[0]).toFixed(1)},${y(p[index]).toFixed(1)}`).join(" "));
    line.setAttribute("fill", "none"); line.setAttribute("stroke", color); line.setAttribute("stroke-width", "1.5");
    svg.appendChild(line);
    const legend = document.createElementNS(SVG, "text");
    legend.setAttribute("x", index === 1 ? 6 : 90); legend.setAttribute("y", height + 11);
    legend.setAttribute("fill", color); legend.setAttribute("font-size", "9");
    legend.textContent = `${label} ${points[points.length - 1][index].toPrecision(3)}`;
    svg.appendChild(legend);
  }
  const axis = document.createElementNS(SVG, "text");
  axis.setAttribute("x", width - 4); axis.setAttribute("y", height + 11); axis.setAttribute("text-anchor", "end");
  axis.setAttribute("fill", "#aaa"); axis.setAttribute("font-size", "9");
  axis.textContent = `steps ${xMin}–${xMax}${useLog ? " · log" : ""}`;
  svg.appendChild(axis);
  return svg;
}

// The frontend's confirmation dialog where it offers one to extensions (dialog service), else the browser's.
async function confirmed(title, message) {
  const dialog = app.extensionManager?.dialog;
  if (typeof dialog?.confirm === "function") {
    try {
      return (await dialog.confirm({ title, message, type: "delete" })) === true;
    } catch (error) {
      console.warn("[TDM jobs] the frontend's confirm dialog failed, using the browser's:", error);
    }
  }
  return window.confirm(`${title}\n\n${message}`);
}

async function request(path, method, label) {
  try {
    const response = await api.fetchApi(path, { method });
    if (!response.ok) {
      const body = await response.json().catch(() => ({}));
      notify("error", `${label}: ${body.error || `HTTP ${response.status}`}`);
      return false;
    }
    return true;
  } catch (error) {
    notify("error", `${label}: ${error}`);
    return false;
  }
}

// The job as a headless run (GET /tdm/jobs/{id}/headless): its config is downloaded as a JSON file and the command
// that trains it (from its newest checkpoint) is shown under the job, to copy; kept across the panel's redraws.
const headlessCommands = new Map(); // job id -> the text shown under its row

function headlessCommand(text) {
  const shown = element("pre", "font-size:11px;white-space:pre-wrap;word-break:break-all;margin:6px 0 0;" +
                        "padding:6px;border-radius:4px;background:rgba(127,127,127,.15);user-select:text;", text);
  shown.className = "tdm-job-headless-command";
  return shown;
}

async function exportHeadless(job, row) {
  let body;
  try {
    const response = await api.fetchApi(`/tdm/jobs/${encodeURIComponent(job.id)}/headless`);
    body = await response.json().catch(() => ({}));
    if (!response.ok) {
      notify("error", `Headless '${job.name}': ${body.error || `HTTP ${response.status}`}`);
      return;
    }
  } catch (error) {
    notify("error", `Headless '${job.name}': ${error}`);
    return;
  }
  const blob = new Blob([JSON.stringify(body.config, null, 2)], { type: "application/json" });
  const link = element("a", "display:none;");
  link.href = URL.createObjectURL(blob);
  link.download = body.file_name;
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  const text = `Downloaded ${body.file_name}. Train it headless (multi-GPU: torchrun):\n${body.command}`;
  headlessCommands.set(job.id, text);
  row.querySelector(".tdm-job-headless-command")?.remove();
  row.appendChild(headlessCommand(text));
  notify("success", `Exported '${job.name}' as ${body.file_name}`);
}

function jobRow(job, jobs, details, refresh) {
  const row = element("div", "border:1px solid var(--border-color,#444);border-radius:6px;padding:8px;margin:8px 0;");
  row.className = "tdm-job";
  row.dataset.jobId = job.id;
  row.dataset.state = job.state;
  const title = element("div", "display:flex;justify-content:space-between;align-items:center;gap:6px;");
  title.appendChild(element("span", "font-weight:600;overflow:hidden;text-overflow:ellipsis;", job.name));
  const state = element("span", `font-size:11px;padding:1px 6px;border-radius:8px;color:#fff;` +
                        `background:${STATE_COLORS[job.state] || "#666"};`, job.state);
  state.className = "tdm-job-state";
  title.appendChild(state);
  const pct = job.iterations ? Math.min(100, (100 * job.step) / job.iterations) : 0;
  const bar = element("div", "height:6px;background:rgba(127,127,127,.3);border-radius:3px;margin:6px 0;");
  bar.appendChild(element("div", `height:6px;width:${pct}%;background:${STATE_COLORS[job.state] || "#4a90d9"};` +
                          "border-radius:3px;"));
  const speed = job.it_per_s ? ` · ${job.it_per_s.toFixed(2)} it/s` : "";
  const eta = ACTIVE.has(job.state) && job.eta_s ? ` · ETA ${formatEta(job.eta_s)}` : "";
  // A failed job's step is where a resume restarts (its last checkpoint); its curve goes on to where it failed.
  const reached = details?.history?.length ? details.history[details.history.length - 1][0] : job.step;
  const lines = [job.state === "failed" && reached > job.step
    ? `failed at step ${reached}/${job.iterations} · a resume restarts from step ${job.step}`
    : `step ${job.step}/${job.iterations}${speed}${eta}`];
  const queue = queueLine(job, jobs);
  if (queue) lines.push(`queued: ${queue}`);
  if (job.latest_lora) lines.push(`LoRA: ${job.latest_lora}`);
  // the training recipe and its source (docs/recipes.md), as the job resolved it; text, never markup
  const recipe = job.settings?.recipe_description;
  if (typeof recipe === "string" && recipe) lines.push(`recipe: ${recipe.slice(0, 300)}`);
  const message = freshMessage(job);
  if (message && job.state !== "failed") lines.push(message);
  const detail = element("div", "font-size:12px;opacity:.85;white-space:pre-wrap;", lines.join("\n"));
  detail.className = "tdm-job-detail";
  row.append(title, bar, detail);
  if (job.state === "failed" && job.message) {
    const error = element("div", `font-size:12px;white-space:pre-wrap;margin-top:4px;color:${STATE_COLORS.failed};`,
                          job.message);
    error.className = "tdm-job-error";
    row.appendChild(error);
  }

  const history = details?.history;
  if (history) row.appendChild(lossCurve(history));
  if (job.has_preview) {
    const image = element("img", "display:block;width:100%;max-width:420px;margin-top:6px;border-radius:4px;" +
                          "image-rendering:auto;");
    image.className = "tdm-job-preview";
    image.alt = `latest student preview of ${job.name}`;
    // The server lays a video job's preview out as a grid (nodes/comfy_backend.py preview_grid): say how to read it.
    image.title = "Latest student preview: the preview prompts side by side; for a video teacher, each clip's " +
      "frames from first to last, top to bottom";
    image.src = api.apiURL(`/tdm/jobs/${encodeURIComponent(job.id)}/preview.png?step=${job.step}`);
    row.appendChild(image);
  }

  const actions = element("div", "margin-top:6px;display:flex;gap:6px;");
  const button = (label, path, method, done, confirmation) => {
    const b = element("button", "padding:2px 10px;", label);
    // The frontend's own (PrimeVue) button look, where its theme styles these classes; the tdm-job-* class is ours.
    b.className = `tdm-job-${label.toLowerCase()} p-button p-component p-button-sm p-button-secondary`;
    b.onclick = async () => {
      if (confirmation && !(await confirmed(`${label} '${job.name}'?`, confirmation))) return;
      b.disabled = true;
      if (await request(`/tdm/jobs/${encodeURIComponent(job.id)}${path}`, method, `${label} '${job.name}'`)) {
        notify("success", `${done} '${job.name}'`);
      }
      refresh();
    };
    return b;
  };
  if (job.state === "running" || job.state === "queued") actions.appendChild(button("Stop", "/stop", "POST", "Stopping"));
  if (job.state === "stopped" || job.state === "failed") actions.appendChild(button("Resume", "/resume", "POST", "Resumed"));
  if (REMOVABLE.has(job.state)) {
    actions.appendChild(button("Remove", "", "DELETE", "Removed",
      "The job's record and checkpoints are deleted: it can no longer be resumed. Its LoRA files in models/loras " +
      "stay."));
  }
  const headless = element("button", "padding:2px 10px;", "Headless");
  headless.className = "tdm-job-headless p-button p-component p-button-sm p-button-secondary";
  headless.title = "Download this job as a headless config (python -m tdm_core.distill / torchrun) and show the " +
    "command that continues it from its newest checkpoint";
  headless.onclick = () => exportHeadless(job, row);
  actions.appendChild(headless);
  if (actions.childElementCount) row.appendChild(actions);
  if (headlessCommands.has(job.id)) row.appendChild(headlessCommand(headlessCommands.get(job.id)));
  return row;
}

// The badge on the sidebar icon. The frontend reads a tab's iconBadge inside a Vue computed (SidebarIcon, frontends
// 1.32 and 1.49 alike), so assigning to the object this file passed to registerSidebarTab changes nothing on screen:
// the sidebar store keeps the tabs in a reactive array, and a write through the store's (reactive) copy of the tab
// re-renders the icon. Frontends without that store or without badges: nothing happens, nothing throws.
const TAB_ID = "tdm-jobs";

function setIconBadge(tab, count) {
  const text = count > 0 ? String(count) : "";
  try {
    const manager = app.extensionManager;
    const tabs = manager?.getSidebarTabs?.() ?? manager?.sidebarTab?.sidebarTabs;
    const live = Array.isArray(tabs) ? tabs.find((t) => t?.id === TAB_ID) : null;
    const target = live ?? tab; // the plain object: no re-render, but the value is right for the next one
    if (target.iconBadge !== text) target.iconBadge = text;
  } catch (error) {
    console.warn("[TDM jobs] could not update the sidebar badge:", error);
  }
}

app.registerExtension({
  name: "comfyui-tdm.jobs",
  async setup() {
    let container = null;
    let running = false;
    let again = false;
    let timer = null;
    const details = new Map(); // job id -> {step, history}: refetched only when the job's step moved

    const render = async () => {
      if (!container) return;
      const response = await api.fetchApi("/tdm/jobs");
      if (!response.ok) throw new Error(`GET /tdm/jobs answered ${response.status}`);
      const { jobs } = await response.json();
      jobs.sort((a, b) => b.created - a.created);
      await Promise.all(jobs.map(async (job) => {
        const known = details.get(job.id);
        if (known && known.step === job.step && known.state === job.state) return;
        const answer = await api.fetchApi(`/tdm/jobs/${encodeURIComponent(job.id)}`);
        if (answer.ok) details.set(job.id, { step: job.step, state: job.state, history: (await answer.json()).history });
      }));
      const list = element("div");
      list.className = "tdm-jobs-list";
      if (!jobs.length) {
        const empty = element("div", "padding:16px 8px;opacity:.8;line-height:1.5;");
        empty.className = "tdm-jobs-empty";
        empty.innerHTML = "<b>No distillation jobs yet.</b><br>Open the <i>Distil your own 4-step LoRA</i> workflow " +
          "(Templates → Extensions → comfyui-tdm) or add a <i>TDM Distill</i> node, and queue it: its job appears " +
          "here with live progress, " +
          "the loss curve and the latest student preview.";
        list.appendChild(empty);
      }
      for (const job of jobs) list.appendChild(jobRow(job, jobs, details.get(job.id), refresh));
      const active = jobs.filter((j) => ACTIVE.has(j.state)).length;
      setIconBadge(tab, active);
      container.querySelector(".tdm-jobs-summary").textContent =
        jobs.length ? `${jobs.length} job${jobs.length > 1 ? "s" : ""}, ${active} active` : "";
      container.querySelector(".tdm-jobs-list")?.remove();
      container.appendChild(list);
    };

    // One render at a time; events arriving meanwhile are folded into one more render after it.
    const refresh = async () => {
      if (running) { again = true; return; }
      running = true;
      try {
        do { again = false; await render(); } while (again);
      } catch (error) {
        notify("error", `could not load the jobs: ${error}`);
      } finally {
        running = false;
      }
    };
    const soon = () => { clearTimeout(timer); timer = setTimeout(refresh, 300); };
    // A job that ends says so wherever the user is (the panel may be closed): one toast per job and end. The event
    // carries the job's record (tdm_core.jobs.JobRecord.to_dict); only live state changes come as events, so
    // opening ComfyUI later shows no stale toasts.
    const announced = new Map(); // job id -> the state last announced
    api.addEventListener("tdm.job.state", (event) => {
      const job = event.detail;
      if (!job?.id) return;
      if (ACTIVE.has(job.state)) announced.delete(job.id); // a resumed job may end again
      if (!REMOVABLE.has(job.state) || announced.get(job.id) === job.state) return;
      announced.set(job.id, job.state);
      const name = `'${job.name}'`;
      if (job.state === "finished") {
        notify("success", `${name} finished at step ${job.step}: models/loras/${job.latest_lora || job.name}`);
      } else if (job.state === "failed") {
        notify("error", `${name} failed at step ${job.step}/${job.iterations}: ${job.message || "see the jobs panel"}`);
      } else {
        notify("info", `${name} stopped at step ${job.step}/${job.iterations}; Resume continues it`);
      }
    });
    for (const event of ["tdm.job.progress", "tdm.job.state", "tdm.job.saved", "tdm.job.removed"]) api.addEventListener(event, soon);

    // The badge follows the jobs whether the panel is open or not: the list is read at start, after each state
    // change or removal, and after the websocket reconnects (events missed meanwhile).
    let badgeTimer = null;
    let badgeRead = 0; // the latest read wins when two overlap
    const countActive = async () => {
      const read = ++badgeRead;
      try {
        const response = await api.fetchApi("/tdm/jobs");
        if (!response.ok) return;
        const { jobs } = await response.json();
        if (read === badgeRead) setIconBadge(tab, jobs.filter((j) => ACTIVE.has(j.state)).length);
      } catch (error) {
        console.warn("[TDM jobs] could not count the active jobs:", error);
      }
    };
    const countSoon = () => { clearTimeout(badgeTimer); badgeTimer = setTimeout(countActive, 200); };
    for (const event of ["tdm.job.state", "tdm.job.removed", "reconnected"]) api.addEventListener(event, countSoon);

    const tab = {
      id: TAB_ID,
      icon: "pi pi-chart-line",
      iconBadge: "",
      title: "TDM jobs",
      tooltip: "TDM distillation jobs: progress, loss curves, previews, stop, resume",
      type: "custom",
      render: (el) => {
        el.style.padding = "8px";
        container = element("div");
        container.className = "tdm-jobs";
        const header = element("div", "display:flex;justify-content:space-between;align-items:baseline;" +
                               "border-bottom:1px solid var(--border-color,#444);padding-bottom:6px;margin-bottom:4px;");
        header.className = "tdm-jobs-header";
        header.appendChild(element("span", "font-size:15px;font-weight:600;", "TDM distillation jobs"));
        const summary = element("span", "font-size:11px;opacity:.7;");
        summary.className = "tdm-jobs-summary";
        header.appendChild(summary);
        container.appendChild(header);
        el.replaceChildren(container);
        refresh();
      },
    };
    app.extensionManager.registerSidebarTab(tab);
    countActive();
  },
});
