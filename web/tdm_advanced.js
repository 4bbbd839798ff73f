// Advanced inputs folded on the standard canvas. The pack marks rarely used inputs `advanced` (nodes/categories.py;
// /object_info carries "advanced": true in the input's options). Frontends fold such inputs only in their "Nodes 2.0"
// (Vue nodes) mode; on the standard LiteGraph canvas (frontends 1.32 and 1.49, default settings) every one is shown,
// which makes TDM Distill 23 widgets tall. LiteGraph itself knows the idea (a widget's `advanced` flag, the node's
// `showAdvanced`, isWidgetVisible, a "Show Advanced" entry in the node's context menu), but the frontend never sets
// the widget flag from the input's options, and LiteGraph's layout still gives a hidden widget its row. This extension
// does both for this pack's nodes (types starting with "TDM"):
// - their advanced widgets (and a widget's companions, e.g. the seed's "control after generate") get the `advanced`
//   flag, so LiteGraph skips them in drawing, hit-testing and its size computation while the node's showAdvanced is
//   off; their layout height is 0 while folded, and their input sockets move off the node so that a link dropped on
//   a visible row never lands on a hidden input;
// - a button row at the end of the node ("show N advanced inputs" / "hide advanced inputs") toggles them, and the
//   node shrinks or grows by the folded rows; LiteGraph's own context-menu entry does the same.
// Nothing else changes: the widgets stay in node.widgets in their order with their values, so a workflow's
// widgets_values and the prompt sent to /api/prompt are what they are without this file (the button is neither saved
// nor sent). A linked advanced input is never folded. In Nodes 2.0 mode, and where the frontend's "always show
// advanced widgets" setting (1.49) is on, the extension does nothing and its button is hidden.
import { app } from "../../scripts/app.js";

const PREFIX = "TDM";
const TOGGLE = "tdm_advanced_toggle";
// Where a folded widget's input socket goes (node coordinates): far above the node, out of every hit test.
const FAR_AWAY = -1e6;

function liteGraph() {
  return globalThis.LiteGraph;
}

function setting(id) {
  try {
    return app.extensionManager?.setting?.get?.(id);
  } catch {
    return undefined;
  }
}

// The frontend folds advanced inputs itself (Nodes 2.0), or the user asked to see them all (1.49's setting). Asked for
// every widget in every frame: the settings are read at most every 200 ms.
let settingsRead = { at: -Infinity, value: false };
function frontendHandles() {
  if (liteGraph()?.vueNodesMode) return true;
  const now = performance.now();
  if (now - settingsRead.at > 200) {
    settingsRead = { at: now, value: setting("Comfy.VueNodes.Enabled") === true ||
      setting("Comfy.Node.AlwaysShowAdvancedWidgets") === true };
  }
  return settingsRead.value;
}

function installFolding(node) {
  const widgets = node.widgets ?? [];
  // each advanced widget, with the widget whose input decides whether it is linked (its own, or its owner's)
  const owners = new Map();
  for (const widget of widgets) {
    if (!widget?.options?.advanced) continue;
    owners.set(widget, widget);
    for (const companion of widget.linkedWidgets ?? []) if (!owners.has(companion)) owners.set(companion, widget);
  }
  if (!owners.size) return null;
  const declared = [...owners].filter(([widget, owner]) => widget === owner).length;

  const linked = (widget) => {
    const slot = node.inputs?.find((input) => input?.widget?.name === widget.name);
    return slot?.link != null;
  };
  const foldable = (widget) => owners.has(widget) && !frontendHandles() && !linked(owners.get(widget));
  const folded = (widget) => foldable(widget) && !node.showAdvanced;
  const rows = new Map(); // widget -> the height of its row when shown (from its own size functions)
  const defaultHeight = () => liteGraph()?.NODE_WIDGET_HEIGHT ?? 20;

  for (const widget of owners.keys()) {
    // LiteGraph's flag: drawWidgets, getWidgetOnPos, the DOM widgets' visibility and computeSize honour it with the
    // node's showAdvanced. A linked one is not flagged, so it shows with its link.
    Object.defineProperty(widget, "advanced", {
      configurable: true, enumerable: true, get: () => foldable(widget), set: () => {},
    });
    // LiteGraph's layout (arrange) gives every widget its row: a folded one gets none.
    if (typeof widget.computeLayoutSize === "function" && typeof widget.computeSize !== "function") {
      const computeLayoutSize = widget.computeLayoutSize;
      widget.computeLayoutSize = function (...args) {
        return folded(widget) ? { minHeight: 0, maxHeight: 0, minWidth: 0 } : computeLayoutSize.apply(this, args);
      };
      rows.set(widget, () => (computeLayoutSize.call(widget, node)?.minHeight ?? defaultHeight()) + 4);
    } else {
      const computeSize = typeof widget.computeSize === "function" ? widget.computeSize : null;
      widget.computeSize = function (width) {
        if (folded(widget)) return [0, -4];
        if (computeSize) return computeSize.call(this, width);
        return [width ?? node.size[0], defaultHeight()];
      };
      rows.set(widget, () => (computeSize ? computeSize.call(widget, node.size[0])[1] : defaultHeight()) + 4);
    }
    // The widget's input socket sits at its row (arranged from widget.y): folded, it would lie on the next row's.
    let y = widget.y ?? 0;
    Object.defineProperty(widget, "y", {
      configurable: true, enumerable: true, get: () => (folded(widget) ? FAR_AWAY : y), set: (value) => { y = value; },
    });
  }

  const foldedHeight = () => {
    let total = 0;
    for (const widget of owners.keys()) if (foldable(widget)) total += rows.get(widget)();
    return total;
  };
  const label = () => {
    const hidden = [...owners].filter(([widget, owner]) => widget === owner && foldable(widget)).length;
    return node.showAdvanced ? "▾ hide advanced inputs" : `▸ show ${hidden} advanced input${hidden === 1 ? "" : "s"}`;
  };

  // The toggle: a button row after the node's inputs (after its last saved widget, so widgets_values keep their
  // positions), never saved nor sent.
  const button = node.addWidget("button", TOGGLE, null, () => setShown(!node.showAdvanced), { serialize: false });
  button.serialize = false;
  button.label = label();
  button.tooltip = `Shows or hides the ${declared} rarely used inputs of this node (their values are kept and used)`;
  const hiddenNow = () => frontendHandles() || ![...owners.keys()].some((widget) => foldable(widget));
  Object.defineProperty(button, "hidden", { configurable: true, enumerable: true, get: hiddenNow, set: () => {} });
  try {
    Object.defineProperty(button.options, "hidden", { configurable: true, enumerable: true, get: hiddenNow });
  } catch {
    // a frozen options object: the button stays visible in Nodes 2.0 mode, where it works all the same
  }
  const at = node.widgets.indexOf(button);
  let last = -1;
  node.widgets.forEach((widget, index) => { if (widget !== button && widget.serialize !== false) last = index; });
  if (at > last + 1) node.widgets.splice(last + 1, 0, ...node.widgets.splice(at, 1));

  const refreshLabel = () => {
    const text = label();
    if (button.label !== text) button.label = text;
  };

  // Shows or folds, and grows or shrinks the node by the rows that appear or go.
  function setShown(shown) {
    shown = !!shown;
    if (!!node.showAdvanced === shown) return;
    const change = foldedHeight();
    node.showAdvanced = shown;
    refreshLabel();
    if (!frontendHandles() && change) {
      const [width, height] = node.size;
      const least = node.computeSize()[1];
      node.setSize([width, Math.max(least, shown ? height + change : height - change)]);
    }
    node.graph?.setDirtyCanvas?.(true, true);
    node.setDirtyCanvas?.(true, true);
  }
  // LiteGraph's context-menu entry ("Show Advanced" / "Hide Advanced") calls toggleAdvanced: the same, with resizing.
  node.toggleAdvanced = function () {
    setShown(!this.showAdvanced);
  };
  const onDrawForeground = node.onDrawForeground;
  node.onDrawForeground = function (...args) {
    refreshLabel(); // the state may change elsewhere (Nodes 2.0's own button, a loaded workflow)
    return onDrawForeground?.apply(this, args);
  };
  // An input of a folded widget that loses its link folds again: the node gives its row back.
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (type, index, connected, ...rest) {
    const result = onConnectionsChange?.apply(this, [type, index, connected, ...rest]);
    const widget = !connected && type === liteGraph()?.INPUT && this.inputs?.[index]?.widget &&
      widgets.find((w) => w.name === this.inputs[index].widget.name);
    if (widget && owners.has(widget) && folded(widget)) {
      let freed = 0;
      for (const [other, owner] of owners) if (owner === widget) freed += rows.get(other)();
      const [width, height] = this.size;
      this.setSize([width, Math.max(this.computeSize()[1], height - freed)]);
      this.setDirtyCanvas?.(true, true);
    }
    return result;
  };

  let configured = false;
  return {
    // A new node: folded, and only as tall as its shown widgets. Sized once the other extensions have added their
    // widgets (tdm_nodes.js's report box; the extensions' order differs between frontends); a node that is being
    // loaded or pasted is configured before that and keeps its saved size.
    created() {
      if (frontendHandles()) return;
      node.showAdvanced = false; // saved with the workflow (LiteGraph serialises it): its size already fits
      refreshLabel();
      queueMicrotask(() => {
        if (configured || frontendHandles() || node.showAdvanced) return;
        node.setSize([node.size[0], Math.max(node.computeSize()[1], node.size[1] - foldedHeight())]);
      });
    },
    // A loaded node. A workflow saved without this state (an older one, or one written outside the browser) was
    // sized for every widget: the folded rows go.
    configured(info) {
      configured = true;
      refreshLabel();
      if (frontendHandles() || info?.showAdvanced !== undefined || node.showAdvanced) return;
      const change = foldedHeight();
      if (change) node.setSize([node.size[0], Math.max(node.computeSize()[1], node.size[1] - change)]);
    },
  };
}

const folding = new WeakMap(); // node -> what installFolding returned

app.registerExtension({
  name: "comfyui-tdm.advanced-inputs",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!String(nodeData?.name ?? "").startsWith(PREFIX)) return;
    const inputs = { ...(nodeData.input?.required ?? {}), ...(nodeData.input?.optional ?? {}) };
    if (!Object.values(inputs).some((spec) => Array.isArray(spec) && spec[1]?.advanced)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function (...args) {
      const result = onNodeCreated?.apply(this, args);
      try {
        const installed = installFolding(this);
        if (installed) {
          folding.set(this, installed);
          installed.created();
        }
      } catch (error) {
        console.warn(`[TDM] could not fold the advanced inputs of ${nodeData.name}:`, error);
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function (info, ...rest) {
      const result = onConfigure?.apply(this, [info, ...rest]);
      try {
        folding.get(this)?.configured(info);
      } catch (error) {
        console.warn(`[TDM] could not fold the advanced inputs of ${nodeData.name}:`, error);
      }
      return result;
    };
  },
});
