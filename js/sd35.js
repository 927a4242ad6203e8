// Frontend extension for comfyui-sd35 (loaded through WEB_DIRECTORY).
//
// 1. SD3.5 Sampler gets a "preset" control: it fills steps, cfg, sampler, schedule, shift and the
//    skip-layer-guidance inputs with the recommended settings of a model variant. The table is the pack's
//    Python table (sd35_core/sampling/defaults.py), served at GET /sd35/defaults; no copy of it lives here.
// 2. A loader that reports what it detected (its "executed" output carries `sd35_info`) shows it on the node:
//    variant, depth, weight dtype, which text encoders / VAE it holds.
// 3. The sampler's slg_layers field is checked while typing against the depth of the model that feeds it;
//    problems show as an inline warning and never block queueing (the Python side has the final word).
//
// Only the frontend's public extension API is used: app.registerExtension hooks, node widgets (addWidget,
// addDOMWidget, widget callbacks), onExecuted (the "executed" event) and api.fetchApi. Checking while typing
// also looks at the text prompt the canvas opens for a widget (app.canvas.prompt_box); if a frontend stops
// providing it, the check simply happens when the value is committed.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const EXTENSION = "comfyui-sd35";
const DEFAULTS_ROUTE = "/sd35/defaults";
const INFO_KEY = "sd35_info";
const SAMPLER = "SD35Sampler";
const CONTROLNET_APPLY = "SD35ControlNetApply";
const DETECTED = "detected model";
const PRESET_WIDGET = "preset";
const APPLY_WIDGET = "apply preset";
const STATUS_WIDGET = "sd35_status";
const STATUS_MARGIN = 4;
const SEARCH_LIMIT = 200; // upstream nodes visited when looking for a ControlNet

// ----------------------------------------------------------------------------------------- defaults table

let defaultsTable = null;
let defaultsError = null;
let defaultsRequest = null;

/** The recommended-settings table from the server (cached; a failed fetch is retried on next use). */
function loadDefaults() {
  if (defaultsTable) return Promise.resolve(defaultsTable);
  if (!defaultsRequest) {
    defaultsRequest = api
      .fetchApi(DEFAULTS_ROUTE)
      .then((response) => {
        if (!response.ok) throw new Error(`GET ${DEFAULTS_ROUTE} answered HTTP ${response.status}`);
        return response.json();
      })
      .then((table) => {
        if (!table || typeof table.variants !== "object") throw new Error(`GET ${DEFAULTS_ROUTE}: no variants`);
        defaultsTable = table;
        defaultsError = null;
        return table;
      })
      .catch((error) => {
        defaultsError = error;
        defaultsRequest = null;
        console.warn(`[${EXTENSION}] recommended settings unavailable:`, error);
        return null;
      });
  }
  return defaultsRequest;
}

/** Preset entries: one per variant, plus "<label> + SLG" for variants with recommended skip-layer guidance. */
function presetEntries(table) {
  const entries = [];
  for (const [variant, d] of Object.entries(table?.variants ?? {})) {
    entries.push({ name: d.label, variant, slg: false });
    if (d.slg) entries.push({ name: `${d.label} + SLG`, variant, slg: true });
  }
  return entries;
}

/** Widget values for a variant: SLG is switched on with its recommended settings, or switched off. */
function presetValues(table, variant, slg) {
  const d = table.variants[variant];
  const values = { steps: d.steps, cfg: d.cfg, sampler: d.sampler, schedule: d.schedule, shift: d.shift, slg_scale: 0 };
  if (slg && d.slg) {
    Object.assign(values, {
      cfg: d.slg.cfg,
      slg_layers: d.slg.layers.join(","),
      slg_scale: d.slg.scale,
      slg_start: d.slg.start,
      slg_end: d.slg.end,
      slg_window: "steps",
    });
  }
  return values;
}

// ----------------------------------------------------------------------------------------- graph helpers

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function nodeClass(node) {
  return node?.comfyClass ?? node?.type;
}

/** The node feeding input `name` of `node`, looking through legacy Reroute nodes. */
function sourceNode(node, name) {
  const slot = node.findInputSlot?.(name) ?? -1;
  if (slot < 0) return null;
  let source = node.getInputNode(slot);
  for (let hops = 0; source && source.type === "Reroute" && hops < 32; hops++) source = source.getInputNode(0);
  return source ?? null;
}

/** The control type of a ControlNet upstream of `node`'s positive input: a type, "unknown", or null if none. */
function upstreamControlType(node) {
  const seen = new Set();
  const queue = [sourceNode(node, "positive")];
  while (queue.length && seen.size < SEARCH_LIMIT) {
    const current = queue.shift();
    if (!current || seen.has(current.id)) continue;
    seen.add(current.id);
    if (nodeClass(current) === CONTROLNET_APPLY) {
      const chosen = widget(current, "control_type")?.value;
      if (chosen && chosen !== "auto") return chosen;
      return sourceNode(current, "control_net")?.sd35Info?.control_type ?? "unknown";
    }
    for (let i = 0; i < (current.inputs?.length ?? 0); i++) queue.push(current.getInputNode(i));
  }
  return null;
}

/** What the loader feeding the sampler detected, or null before it has run. */
function modelInfo(sampler) {
  const info = sourceNode(sampler, "model")?.sd35Info;
  return info && info.kind !== "text_encoders" ? info : null;
}

// ----------------------------------------------------------------------------------------- status line

/** A small read-only text area under a node's widgets (not saved, not sent with the prompt). */
function statusWidget(node) {
  let w = widget(node, STATUS_WIDGET);
  if (w) return w;
  const element = document.createElement("div");
  element.className = "sd35-status";
  Object.assign(element.style, {
    font: "11px sans-serif",
    lineHeight: "14px",
    padding: "2px 6px",
    whiteSpace: "pre-wrap",
    overflow: "hidden",
    color: "var(--descrip-text, #aaa)",
    pointerEvents: "none",
  });
  // The widget's height includes a margin above and below the element.
  const height = () => element.sd35Lines * 14 + 6 + 2 * STATUS_MARGIN;
  w = node.addDOMWidget(STATUS_WIDGET, "sd35_status", element, {
    serialize: false,
    hideOnZoom: false,
    margin: STATUS_MARGIN,
    getValue: () => element.textContent,
    setValue: () => {},
    getMinHeight: height,
    getMaxHeight: height,
  });
  w.serialize = false;
  element.sd35Lines = 1;
  return w;
}

/** Show `lines` ({text, warn}) in the node's status area, growing the node to fit. */
function setStatus(node, lines) {
  const w = statusWidget(node);
  const element = w.element;
  element.replaceChildren(
    ...lines.map(({ text, warn }) => {
      const line = document.createElement("div");
      line.textContent = text;
      if (warn) {
        line.className = "sd35-warning";
        line.style.color = "#f0a020";
      }
      return line;
    }),
  );
  element.sd35Lines = Math.max(1, lines.length);
  const needed = node.computeSize();
  if (needed[1] > node.size[1] || needed[0] > node.size[0]) {
    node.setSize([Math.max(node.size[0], needed[0]), Math.max(node.size[1], needed[1])]);
  }
  node.setDirtyCanvas?.(true, true);
}

/** Lines describing what a loader detected. Unknown keys are ignored. */
function describeInfo(info) {
  const lines = [];
  const head = [];
  if (info.kind === "controlnet") {
    if (info.control_type) head.push(`${info.control_type} ControlNet`);
    if (info.layers != null) head.push(`${info.layers} layers`);
  } else {
    if (info.label ?? info.variant) head.push(info.label ?? info.variant);
    if (info.depth != null) head.push(`depth ${info.depth}`);
  }
  if (info.dtype) head.push(info.dtype);
  if (info.device) head.push(info.device);
  if (head.length) lines.push({ text: head.join(" · ") });
  if (Array.isArray(info.encoders)) {
    const text = info.encoders.length ? info.encoders.join(", ") : "none bundled";
    lines.push({ text: `text encoders: ${text}` });
  }
  if (info.vae != null) lines.push({ text: `VAE: ${info.vae ? "bundled" : "not bundled"}` });
  if (info.max_image_size) lines.push({ text: `largest image side: ${info.max_image_size} px` });
  return lines;
}

// ----------------------------------------------------------------------------------------- SLG layer check

/**
 * Problems with an slg_layers text for a model of `depth` blocks (depth null: syntax only). The sampler parses
 * the text even when skip-layer guidance is off, but only checks the depth when it is on (scale above 0).
 */
function slgProblems(text, depth) {
  const problems = [];
  const layers = [];
  for (const part of String(text ?? "").replace(/\s+/g, "").split(",")) {
    if (!part) continue;
    if (!/^\d+$/.test(part)) {
      problems.push(`slg_layers: "${part}" is not a block number (write them like 7,8,9)`);
      continue;
    }
    layers.push(Number(part));
  }
  if (depth != null) {
    const outside = layers.filter((layer) => layer >= depth);
    if (outside.length) {
      problems.push(`slg_layers: ${outside.join(", ")} not in this model: it has ${depth} blocks (0-${depth - 1})`);
    }
  }
  return problems;
}

/** Recompute the sampler's status: detected model, preset notes and SLG warnings for `layersText`. */
function refreshSampler(node, layersText = widget(node, "slg_layers")?.value) {
  const info = modelInfo(node);
  const lines = [];
  if (info) {
    const depth = info.depth != null ? ` · depth ${info.depth}` : "";
    lines.push({ text: `model: ${info.label ?? info.variant}${depth}` });
  }
  if (node.sd35PresetNote) lines.push(node.sd35PresetNote);
  const slgOn = Number(widget(node, "slg_scale")?.value ?? 0) > 0;
  const depth = slgOn ? info?.depth ?? null : null;
  for (const problem of slgProblems(layersText, depth)) lines.push({ text: problem, warn: true });
  if (!lines.length) lines.push({ text: "preset: choose a model, then apply preset" });
  setStatus(node, lines);
  return lines;
}

/** Check as the user types: hook the text prompt the slg_layers widget opens. */
function watchLayersPrompt(node, layersWidget) {
  const onClick = layersWidget.onClick;
  if (typeof onClick !== "function") return;
  layersWidget.onClick = function (options) {
    const result = onClick.call(this, options);
    const dialog = app.canvas?.prompt_box;
    const input = dialog?.querySelector?.(".value");
    if (input) {
      const hint = document.createElement("div");
      hint.className = "sd35-warning";
      Object.assign(hint.style, {
        color: "#f0a020",
        font: "11px sans-serif",
        marginTop: "4px",
        whiteSpace: "pre-line",
      });
      dialog.append(hint);
      const check = () => {
        const lines = refreshSampler(node, input.value).filter((line) => line.warn);
        hint.textContent = lines.map((line) => line.text).join("\n");
      };
      input.addEventListener("input", check);
      check();
      // Enter commits (the widget callback refreshes), Escape discards: either way show the kept value again.
      const close = dialog.close;
      dialog.close = function (...args) {
        const closed = close?.apply(this, args);
        refreshSampler(node);
        return closed;
      };
    }
    return result;
  };
}

// ----------------------------------------------------------------------------------------- presets

async function applyPreset(node) {
  const table = await loadDefaults();
  if (!table) {
    const reason = defaultsError?.message ?? "no answer";
    node.sd35PresetNote = { text: `recommended settings unavailable (${reason})`, warn: true };
    refreshSampler(node);
    return false;
  }
  const presetWidget = widget(node, PRESET_WIDGET);
  if (presetWidget) presetWidget.options.values = [DETECTED, ...presetEntries(table).map((e) => e.name)];
  const choice = presetWidget?.value ?? DETECTED;
  let variant;
  let slg;
  if (choice === DETECTED) {
    const info = modelInfo(node);
    if (!info?.variant || !table.variants[info.variant]) {
      node.sd35PresetNote = {
        text: "no model detected yet: queue the workflow once, or choose the model in preset",
        warn: true,
      };
      refreshSampler(node);
      return false;
    }
    variant = info.variant;
    const control = upstreamControlType(node);
    if (control) {
      const keys = Object.keys(table.variants).filter((k) => k.startsWith(`${variant}_controlnet_`));
      variant = keys.find((k) => k.endsWith(`_${control}`)) ?? keys[0] ?? variant;
    }
    slg = Boolean(table.variants[variant].slg);
  } else {
    const entry = presetEntries(table).find((e) => e.name === choice);
    if (!entry) return false;
    ({ variant, slg } = entry);
  }
  for (const [name, value] of Object.entries(presetValues(table, variant, slg))) {
    const w = widget(node, name);
    if (!w) continue;
    w.value = value;
    w.callback?.(w.value, app.canvas, node);
  }
  node.sd35PresetNote = { text: `preset: ${presetLabel(table, variant, slg)} applied` };
  refreshSampler(node);
  node.graph?.change?.();
  return true;
}

function presetLabel(table, variant, slg) {
  return `${table.variants[variant].label}${slg && table.variants[variant].slg ? " + SLG" : ""}`;
}

function setupSampler(node) {
  const presetWidget = node.addWidget(
    "combo",
    PRESET_WIDGET,
    DETECTED,
    () => {},
    { values: [DETECTED, ...presetEntries(defaultsTable).map((e) => e.name)], serialize: false },
  );
  presetWidget.serialize = false;
  presetWidget.tooltip =
    "Recommended settings to fill in (Stability's reference values). 'detected model' uses what the connected " +
    "loader found when it last ran, with its ControlNet and skip-layer guidance where recommended.";
  const applyWidget = node.addWidget("button", APPLY_WIDGET, null, () => applyPreset(node), { serialize: false });
  applyWidget.serialize = false;
  applyWidget.tooltip = "Fill steps, cfg, sampler, schedule, shift and skip-layer guidance from the preset.";

  for (const name of ["slg_layers", "slg_scale"]) {
    const w = widget(node, name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      const result = callback?.apply(this, args);
      refreshSampler(node);
      return result;
    };
  }
  const layers = widget(node, "slg_layers");
  if (layers) watchLayersPrompt(node, layers);
  refreshSampler(node);
}

function refreshAllSamplers() {
  for (const node of app.graph?.nodes ?? []) {
    if (nodeClass(node) === SAMPLER && widget(node, PRESET_WIDGET)) refreshSampler(node);
  }
}

// ----------------------------------------------------------------------------------------- registration

app.registerExtension({
  name: EXTENSION,

  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith("SD35")) return;

    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const info = output?.[INFO_KEY]?.[0];
      if (info && typeof info === "object") {
        this.sd35Info = info;
        setStatus(this, describeInfo(info));
        refreshAllSamplers();
      }
      return result;
    };

    if (nodeData.name !== SAMPLER) return;
    await loadDefaults(); // so the preset list is complete when the first sampler is created

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      setupSampler(this);
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      refreshSampler(this); // widget values were just restored from the workflow
      return result;
    };
    const onConnectionsChange = nodeType.prototype.onConnectionsChange;
    nodeType.prototype.onConnectionsChange = function () {
      const result = onConnectionsChange?.apply(this, arguments);
      if (widget(this, PRESET_WIDGET)) refreshSampler(this);
      return result;
    };
  },
});
