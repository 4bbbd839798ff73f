// What a TDM node did, shown on the node itself. The nodes send a text report with their result (ui "text": the LoRA
// loader's matched modules and the strength it applied, the preset "auto" picked, the sigmas), but the frontend
// draws such text only on its own preview nodes. This extension adds a read-only "report" box to the nodes that send
// one and fills it when the node runs. The box is never saved into the workflow (serialize: false), so saved widget
// values keep their positions.
import { app } from "../../scripts/app.js";

const REPORTING_NODES = new Set(["TDMLoraLoader", "TDMDistillLoraLoader", "TDMKSampler", "TDMScheduler"]);
const REPORT = "report";
const STRENGTH_MODE_NODES = new Set(["TDMLoraLoader", "TDMDistillLoraLoader"]);

function addReportWidget(node) {
  const box = document.createElement("div");
  box.className = "tdm-report";
  box.style.cssText =
    "font: 11px/1.35 monospace; white-space: pre-wrap; overflow: auto; padding: 4px 6px; border-radius: 4px;" +
    "background: var(--comfy-input-bg, #222); color: var(--input-text, #ddd); opacity: .9; min-height: 2.8em;";
  box.textContent = "(runs show here what was applied)";
  const widget = node.addDOMWidget(REPORT, "tdm_report", box, {
    serialize: false,
    getValue: () => box.textContent,
    setValue: (value) => { box.textContent = value; },
    getMinHeight: () => 48,
  });
  widget.serialize = false;
  return widget;
}

// TDM LoRA Loader and TDM LoRA from Distill Job: in auto mode the strength widget is not used; grey it out and say so, so its 1.000 is never read
// as the applied strength (SD3 gets 0.125).
function linkStrengthToMode(node) {
  const mode = node.widgets?.find((w) => w.name === "strength_mode");
  const strength = node.widgets?.find((w) => w.name === "strength");
  if (!mode || !strength) return;
  const update = () => {
    const auto = mode.value === "auto";
    strength.disabled = auto;
    strength.label = auto ? "strength (auto: not used)" : "strength";
    node.setDirtyCanvas?.(true, true);
  };
  const callback = mode.callback;
  mode.callback = function (...args) {
    const result = callback?.apply(this, args);
    update();
    return result;
  };
  update();
  return update;
}

app.registerExtension({
  name: "comfyui-tdm.node-reports",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!REPORTING_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      addReportWidget(this);
      if (STRENGTH_MODE_NODES.has(nodeData.name)) this.tdmUpdateStrength = linkStrengthToMode(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (...args) {
      const result = onConfigure?.apply(this, args);
      this.tdmUpdateStrength?.(); // a loaded workflow's saved strength_mode
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, [message]);
      const text = message?.text;
      if (!text) return;
      const widget = this.widgets?.find((w) => w.name === REPORT);
      if (widget) widget.value = Array.isArray(text) ? text.join("\n") : String(text);
      this.setDirtyCanvas?.(true, true);
    };
  },
});
