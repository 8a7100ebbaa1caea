// diffusion-merge: a block-weight editor on the merge nodes — one slider per block group of the model.
//
// The sliders edit the node's own `weight_rules` text: each block whose weight is not 1 becomes a line
// `@IN04 = 0.5` (the names of merging/blocks.py); every other line (regex rules, the coarse @input … presets,
// comments) is kept as it is. So the workflow saves exactly what it saved before — the text — and the text
// stays editable by hand. The only widget added is a button, last and never serialised (widgets_values keep
// their positions); the architecture chosen by hand, if any, is a node property.
//
// Which blocks: GET /diffusion_merge/blocks (nodes/blocks_server.py) reads the header of the file the loader
// upstream of `base` names (checkpoints / diffusion_models), builds the demo loaders' key lists, or gives the
// groups of an architecture preset picked in the dialog.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const MERGE_NODES = new Set([
  "DM_MergeTaskArithmetic",
  "DM_MergeTIES",
  "DM_MergeDARE",
  "DM_MergeLocalizeAndStitch",
  "DM_MergeDRM",
]);
const DEMO_LOADERS = new Set(["DM_DemoCheckpointLoader", "DM_DemoWanLoader", "DM_LoadMiniModel"]);
const FILE_WIDGETS = { ckpt_name: "checkpoints", unet_name: "diffusion_models" };
const RULES = "weight_rules";
const ROUTE = "/diffusion_merge/blocks";
const BUTTON = "block weights…";
const PROP_PRESET = "block weights: architecture"; // "<architecture id>|<preset>", or absent = detect
const MAX_HOPS = 32;
const SLIDER = { min: 0, max: 2, step: 0.05 };

// -- the rule text ------------------------------------------------------------------------------------

const NUMBERED = /^([A-Za-z]+?)(\d+)$/;
const SERIES = new Set(["IN", "OUT", "J", "D", "S", "B", "T"]);

// The canonical name of a block (as merging/blocks.py canonical_block_name), or null for other names.
export function canonicalBlock(name) {
  const match = NUMBERED.exec(name.trim());
  if (!match) return ["embed", "final"].includes(name.trim()) ? name.trim() : null;
  const prefix = match[1].toUpperCase();
  const canonical = `${prefix}${String(Number(match[2])).padStart(2, "0")}`;
  return SERIES.has(prefix) || canonical === "M00" ? canonical : null;
}

// A `@NAME = value` line's block and value (comments allowed), or null for any other line.
export function blockRule(line) {
  const match = /^\s*@\s*([^=#\s]+)\s*=\s*([^#\s]+)\s*(#.*)?$/.exec(line);
  if (!match) return null;
  const name = canonicalBlock(match[1]);
  const value = Number(match[2]);
  return name && Number.isFinite(value) ? { name, value } : null;
}

// Slider values from the text: every group 1, then each `@NAME = v` line of a shown group (the last one wins,
// as the merge nodes read it).
export function valuesFromText(text, names) {
  const values = Object.fromEntries(names.map((name) => [name, 1]));
  for (const line of (text ?? "").split("\n")) {
    const rule = blockRule(line);
    if (rule && rule.name in values) values[rule.name] = rule.value;
  }
  return values;
}

function formatValue(value) {
  return String(Number(Number(value).toFixed(4)));
}

// The text with the shown groups' lines replaced: other lines kept in order, then one line per group whose
// weight is not 1, in slider order.
export function rewriteRules(text, names, values) {
  const shown = new Set(names);
  const kept = (text ?? "").split("\n").filter((line) => !shown.has(blockRule(line)?.name));
  while (kept.length && !kept[kept.length - 1].trim()) kept.pop();
  const rules = names.filter((name) => Number(values[name]) !== 1).map((name) => `@${name} = ${formatValue(values[name])}`);
  return [...kept, ...rules].join("\n");
}

// -- where the model comes from -----------------------------------------------------------------------

function widget(node, name) {
  return node?.widgets?.find((w) => w.name === name);
}

function linkedInput(node, name) {
  const slot = node?.findInputSlot?.(name) ?? -1;
  return slot >= 0 && node.inputs[slot].link != null ? node.getInputNode(slot) : null;
}

function firstModelInput(node) {
  const input = (node?.inputs ?? []).find((entry) => entry.type === "MODEL" && entry.link != null);
  return input ? linkedInput(node, input.name) : null;
}

// The query that names the model feeding `base`: a loader's file or a demo loader; null when none is found.
export function sourceQuery(node) {
  let current = linkedInput(node, "base");
  for (let hop = 0; current && hop < MAX_HOPS; hop++) {
    if (DEMO_LOADERS.has(current.type)) return { demo: current.type };
    for (const [name, folder] of Object.entries(FILE_WIDGETS)) {
      const value = widget(current, name)?.value;
      if (value && !linkedInput(current, name)) return { folder, file: String(value) };
    }
    current = current.type === "Reroute" ? current.getInputNode(0) : firstModelInput(current);
  }
  return null;
}

async function fetchBlocks(query) {
  const response = await api.fetchApi(`${ROUTE}?${new URLSearchParams(query)}`);
  const data = await response.json();
  if (!response.ok || data.error) throw new Error(data.error ?? `HTTP ${response.status}`);
  return data;
}

// -- the dialog ---------------------------------------------------------------------------------------

function element(tag, style = {}, props = {}) {
  const el = document.createElement(tag);
  Object.assign(el.style, style);
  return Object.assign(el, props);
}

function rulesWidget(node) {
  return widget(node, RULES);
}

function writeRules(node, text) {
  const rules = rulesWidget(node);
  if (!rules || rules.value === text) return;
  rules.value = text;
  rules.callback?.(text);
  node.setDirtyCanvas(true, true);
}

class BlockWeightsDialog {
  constructor(node, menu) {
    this.node = node;
    this.menu = menu;
    this.root = element("div", {
      position: "fixed",
      top: "8vh",
      left: "50%",
      transform: "translateX(-50%)",
      width: "520px",
      maxHeight: "84vh",
      display: "flex",
      flexDirection: "column",
      background: "#222",
      color: "#ddd",
      border: "1px solid #555",
      borderRadius: "6px",
      boxShadow: "0 8px 30px rgba(0,0,0,.6)",
      font: "13px sans-serif",
      zIndex: 10000,
    });
    this.root.className = "dm-block-weights";
    this.root.dataset.nodeId = String(node.id);
    const header = element("div", { display: "flex", alignItems: "center", padding: "8px 10px", gap: "8px" });
    header.append(element("b", { flex: "1" }, { textContent: `Block weights — ${node.title}` }));
    header.append(this.button("reset all to 1", () => this.resetAll()));
    header.append(this.button("✕", () => this.close(), "dm-close"));
    this.select = element("select", { margin: "0 10px", background: "#333", color: "#ddd" });
    this.select.className = "dm-architecture";
    this.select.addEventListener("change", () => this.choose(this.select.value));
    this.status = element("div", { padding: "6px 10px", color: "#aaa", minHeight: "1.2em" });
    this.status.className = "dm-status";
    this.list = element("div", { overflowY: "auto", padding: "4px 10px 10px", flex: "1" });
    this.list.className = "dm-sliders";
    this.root.append(header, this.select, this.status, this.list);
    this.fillMenu();
    document.body.append(this.root);
  }

  button(label, onClick, className = "") {
    const el = element("button", { background: "#333", color: "#ddd", border: "1px solid #555", cursor: "pointer" });
    el.textContent = label;
    el.className = className;
    el.addEventListener("click", onClick);
    return el;
  }

  fillMenu() {
    this.select.append(element("option", {}, { value: "", textContent: "detect from the model" }));
    for (const arch of this.menu.architectures) {
      for (const preset of arch.presets) {
        this.select.append(element("option", {}, { value: `${arch.id}|${preset}`, textContent: `${arch.label}: ${preset}` }));
      }
    }
    this.select.value = this.node.properties?.[PROP_PRESET] ?? "";
  }

  async choose(choice) {
    this.node.properties ??= {};
    if (choice) this.node.properties[PROP_PRESET] = choice;
    else delete this.node.properties[PROP_PRESET];
    await this.load();
  }

  // Groups from the chosen preset, else from the model upstream; a failed detection falls back to the menu.
  async load() {
    const choice = this.node.properties?.[PROP_PRESET];
    let query = null;
    if (choice) {
      const [architecture, preset] = choice.split("|");
      query = { architecture, preset };
    } else {
      query = sourceQuery(this.node);
    }
    if (!query) {
      this.show(null, "No loader with a model file found upstream of 'base': pick the architecture above.");
      return;
    }
    try {
      const data = await fetchBlocks(query);
      const where = choice ? "chosen by hand" : `detected from ${data.source}`;
      const other = data.ungrouped ? ` · ${data.ungrouped} keys in no group (use regex rules)` : "";
      this.show(data, `${data.label}, ${where}: ${data.groups.length} groups${other}`);
    } catch (error) {
      this.show(null, `${error.message} — pick the architecture above.`);
    }
  }

  show(data, message) {
    this.status.textContent = message;
    this.list.replaceChildren();
    this.names = data ? data.groups.map((group) => group.name) : [];
    this.values = valuesFromText(rulesWidget(this.node)?.value, this.names);
    this.rows = {};
    for (const group of data?.groups ?? []) this.list.append(this.row(group));
  }

  row(group) {
    const row = element("div", { display: "flex", alignItems: "center", gap: "8px", margin: "2px 0" });
    row.className = "dm-block";
    row.dataset.block = group.name;
    const label = element("span", { width: "64px", fontFamily: "monospace" }, { textContent: group.name });
    if (group.keys != null) label.title = `${group.keys} keys`;
    const slider = element("input", { flex: "1" }, { type: "range", ...SLIDER, value: this.values[group.name] });
    const number = element("input", { width: "64px", background: "#333", color: "#ddd" }, { type: "number", step: SLIDER.step });
    number.value = formatValue(this.values[group.name]);
    slider.addEventListener("input", () => this.set(group.name, Number(slider.value), number));
    number.addEventListener("change", () => {
      const value = Number(number.value);
      if (Number.isFinite(value)) this.set(group.name, value, null, slider);
    });
    this.rows[group.name] = { slider, number };
    row.append(label, slider, number);
    return row;
  }

  set(name, value, number = null, slider = null) {
    this.values[name] = value;
    if (number) number.value = formatValue(value);
    if (slider) slider.value = String(value);
    writeRules(this.node, rewriteRules(rulesWidget(this.node)?.value, this.names, this.values));
  }

  resetAll() {
    for (const name of this.names ?? []) {
      this.values[name] = 1;
      this.rows[name].slider.value = "1";
      this.rows[name].number.value = "1";
    }
    writeRules(this.node, rewriteRules(rulesWidget(this.node)?.value, this.names ?? [], this.values ?? {}));
  }

  close() {
    this.root.remove();
    if (this.node.dmBlockWeights === this) this.node.dmBlockWeights = null;
  }
}

async function openEditor(node) {
  node.dmBlockWeights?.close();
  let menu = { architectures: [] };
  try {
    menu = await fetchBlocks({});
  } catch (error) {
    console.warn("diffusion-merge: block list unavailable", error);
  }
  const dialog = new BlockWeightsDialog(node, menu);
  node.dmBlockWeights = dialog;
  await dialog.load();
  return dialog;
}

app.registerExtension({
  name: "diffusion_merge.block_weights",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!MERGE_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const button = this.addWidget("button", BUTTON, null, () => openEditor(this), { serialize: false });
      button.serialize = false; // last and never saved: widgets_values keep their positions
      this.dmOpenBlockWeights = () => openEditor(this);
      return result;
    };
    const onRemoved = nodeType.prototype.onRemoved;
    nodeType.prototype.onRemoved = function () {
      this.dmBlockWeights?.close();
      return onRemoved?.apply(this, arguments);
    };
  },
});
