// TDM distillation jobs panel: a sidebar tab listing the background jobs of comfyui-tdm with live progress
// (websocket events tdm.job.*) and Stop / Resume buttons (POST /tdm/jobs/<id>/stop|resume).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ACTIVE = new Set(["queued", "running", "stopping"]);

function formatEta(seconds) {
  if (seconds == null || !isFinite(seconds)) return "";
  const m = Math.floor(seconds / 60), s = Math.round(seconds % 60);
  return m > 0 ? `${m} min ${s} s` : `${s} s`;
}

function jobRow(job, refresh) {
  const row = document.createElement("div");
  row.className = "tdm-job";
  row.dataset.jobId = job.id;
  row.dataset.state = job.state;
  row.style.cssText = "border:1px solid var(--border-color,#444);border-radius:6px;padding:8px;margin:6px 0;";
  const pct = job.iterations ? Math.min(100, (100 * job.step) / job.iterations) : 0;
  const title = document.createElement("div");
  title.style.cssText = "display:flex;justify-content:space-between;font-weight:600;";
  title.textContent = job.name;
  const state = document.createElement("span");
  state.className = "tdm-job-state";
  state.textContent = job.state;
  title.appendChild(state);
  const bar = document.createElement("div");
  bar.style.cssText = "height:6px;background:#333;border-radius:3px;margin:6px 0;";
  bar.innerHTML = `<div style="height:6px;width:${pct}%;background:#6a9ff7;border-radius:3px;"></div>`;
  const detail = document.createElement("div");
  detail.style.cssText = "font-size:12px;opacity:.85;white-space:pre-wrap;";
  const speed = job.it_per_s ? ` · ${job.it_per_s.toFixed(2)} it/s` : "";
  const eta = ACTIVE.has(job.state) && job.eta_s ? ` · ETA ${formatEta(job.eta_s)}` : "";
  detail.textContent = `step ${job.step}/${job.iterations}${speed}${eta}` +
    (job.latest_lora ? `\nLoRA: ${job.latest_lora}` : "") + (job.message ? `\n${job.message}` : "");
  row.append(title, bar, detail);
  const actions = document.createElement("div");
  actions.style.cssText = "margin-top:6px;display:flex;gap:6px;";
  const button = (label, path) => {
    const b = document.createElement("button");
    b.textContent = label;
    b.className = `tdm-job-${label.toLowerCase()}`;
    b.onclick = async () => {
      b.disabled = true;
      const response = await api.fetchApi(`/tdm/jobs/${encodeURIComponent(job.id)}/${path}`, { method: "POST" });
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        alert(body.error || `${label} failed (${response.status})`);
      }
      refresh();
    };
    return b;
  };
  if (job.state === "running" || job.state === "queued") actions.appendChild(button("Stop", "stop"));
  if (job.state === "stopped" || job.state === "failed") actions.appendChild(button("Resume", "resume"));
  if (actions.childElementCount) row.appendChild(actions);
  return row;
}

app.registerExtension({
  name: "comfyui-tdm.jobs",
  async setup() {
    let container = null;
    let pending = false;
    const refresh = async () => {
      if (!container || pending) return;
      pending = true;
      try {
        const response = await api.fetchApi("/tdm/jobs");
        const { jobs } = await response.json();
        container.replaceChildren();
        if (!jobs.length) {
          container.textContent = "No TDM distillation jobs yet. Queue a workflow with the TDM Distill node.";
        }
        for (const job of jobs.sort((a, b) => b.created - a.created)) container.appendChild(jobRow(job, refresh));
      } finally {
        pending = false;
      }
    };
    for (const event of ["tdm.job.progress", "tdm.job.state", "tdm.job.saved"]) {
      api.addEventListener(event, refresh);
    }
    app.extensionManager.registerSidebarTab({
      id: "tdm-jobs",
      icon: "pi pi-chart-line",
      title: "TDM jobs",
      tooltip: "TDM distillation jobs: progress, stop, resume",
      type: "custom",
      render: (el) => {
        el.style.padding = "8px";
        container = document.createElement("div");
        container.className = "tdm-jobs";
        el.replaceChildren(container);
        refresh();
      },
    });
  },
});
