// diffusion-merge: σ-range preview on the routing nodes (Route Experts by σ, Routed Guider).
// A canvas widget draws the real σ schedule, computed by the server route /diffusion_merge/sigmas, as one
// bar per sampling step coloured by the expert that serves it, with the boundaries. The widget is NOT
// serialised (serialize: false, added last), so saved workflows keep exactly the node's widgets_values; the
// preview's own settings live in node properties, written only when changed from the node's context menu.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const ROUTING_NODES = new Set(["DM_RoutedModel", "DM_RoutedGuider"]);
const EXPERT_NODES = new Set(["DM_RouteExpert", "DM_RouteTaskVectorExpert"]);
const ROUTE = "/diffusion_merge/sigmas";
const WIDGET_NAME = "dm_sigma_preview";
const HEIGHT = 130;
const MARGIN = 10;
const FETCH_DELAY_MS = 250;
const MAX_CHAIN = 64;
const DEFAULT_STEPS = 20;
const DEFAULT_SCHEDULER = "normal";
const MODELS = ["auto", "sd", "flow", "flux"];
const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7"];
const PROP = { steps: "σ preview steps", scheduler: "σ preview scheduler", model: "σ preview model", shift: "σ preview shift" };

// -- reading the graph ------------------------------------------------------------------------------

function widgetValue(node, name) {
  return node?.widgets?.find((w) => w.name === name)?.value;
}

function inputLinked(node, name) {
  return node?.inputs?.some((input) => input.name === name && input.link != null);
}

function upstream(node, name) {
  const slot = node?.findInputSlot?.(name) ?? -1;
  return slot < 0 ? null : node.getInputNode(slot);
}

// The experts feeding a routing node, first (highest noise) first: [{end, unit}], or a reason why not.
function collectExperts(node) {
  const experts = [];
  let current = upstream(node, "experts");
  for (let guard = 0; current && guard < MAX_CHAIN; guard++) {
    if (current.type === "Reroute") {
      current = current.getInputNode(0);
      continue;
    }
    if (!EXPERT_NODES.has(current.type)) return { problem: `experts come from ${current.type}` };
    if (inputLinked(current, "end") || inputLinked(current, "unit")) return { problem: "an expert's end is linked" };
    experts.unshift({ end: Number(widgetValue(current, "end")), unit: widgetValue(current, "unit") });
    current = upstream(current, "experts");
  }
  return experts.length ? { experts } : { problem: "connect Route Expert nodes" };
}

// Steps and scheduler of the sampler this node feeds (KSampler, KSamplerAdvanced, BasicScheduler…), if any.
function findSampler(node) {
  const seen = new Set([node.id]);
  let frontier = [node];
  for (let depth = 0; depth < 4 && frontier.length; depth++) {
    const next = [];
    for (const current of frontier) {
      for (let slot = 0; slot < (current.outputs?.length ?? 0); slot++) {
        for (const target of current.getOutputNodes(slot) ?? []) {
          if (seen.has(target.id)) continue;
          seen.add(target.id);
          const found = samplerSettings(target) ?? samplerSettings(upstream(target, "sigmas"));
          if (found) return found;
          next.push(target);
        }
      }
    }
    frontier = next;
  }
  return null;
}

function samplerSettings(node) {
  const steps = widgetValue(node, "steps");
  const scheduler = widgetValue(node, "scheduler");
  return steps != null && scheduler != null ? { steps: Number(steps), scheduler } : null;
}

function previewQuery(node) {
  const { experts, problem } = collectExperts(node);
  if (problem) return { problem };
  const sampler = findSampler(node);
  const props = node.properties ?? {};
  const params = new URLSearchParams({
    steps: String(props[PROP.steps] || sampler?.steps || DEFAULT_STEPS),
    scheduler: props[PROP.scheduler] || sampler?.scheduler || DEFAULT_SCHEDULER,
    model: props[PROP.model] || "auto",
    shift: String(props[PROP.shift] ?? 3.0),
    node: String(node.id),
    ends: experts.map((e) => e.end).join(","),
    units: experts.map((e) => e.unit).join(","),
  });
  return { query: params.toString() };
}

// -- fetching -----------------------------------------------------------------------------------------

function refresh(node) {
  const { query, problem } = previewQuery(node);
  const state = (node.dmPreview ??= {});
  if (problem) {
    Object.assign(state, { key: null, data: null, error: problem });
    return;
  }
  if (query === state.key) return;
  state.key = query;
  clearTimeout(state.timer);
  state.timer = setTimeout(async () => {
    try {
      const response = await api.fetchApi(`${ROUTE}?${query}`);
      const data = await response.json();
      if (state.key !== query) return;
      Object.assign(state, { data: response.ok ? data : null, error: data.error ?? null });
    } catch (error) {
      Object.assign(state, { data: null, error: String(error) });
    }
    node.setDirtyCanvas(true, false);
  }, FETCH_DELAY_MS);
}

// -- drawing -------------------------------------------------------------------------------------------

function logScale(sigmas) {
  const positive = sigmas.filter((s) => s > 0);
  const low = Math.log(Math.min(...positive));
  const high = Math.log(Math.max(...positive));
  return (sigma) => (sigma <= 0 ? 0 : (Math.log(sigma) - low) / Math.max(high - low, 1e-9));
}

function drawBars(ctx, data, left, top, width, height) {
  const steps = data.step_experts ?? data.sigmas.slice(0, -1).map(() => null);
  const scale = logScale(data.sigmas);
  const bar = width / steps.length;
  steps.forEach((expert, i) => {
    const h = Math.max(2, scale(data.sigmas[i]) * height);
    ctx.fillStyle = expert == null ? "#666" : COLORS[expert % COLORS.length];
    ctx.fillRect(left + i * bar + 1, top + height - h, Math.max(1, bar - 2), h);
  });
  ctx.strokeStyle = "#ddd";
  ctx.setLineDash([4, 3]);
  (data.ends_sigma ?? []).slice(0, -1).forEach((end) => {
    const y = top + height - scale(end) * height;
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + width, y);
    ctx.stroke();
  });
  ctx.setLineDash([]);
}

function caption(data) {
  const spans = (data.spans ?? [])
    .map((s) => (s.expert == null ? `none ${s.first + 1}–${s.last + 1}` : `E${s.expert + 1}: ${s.first + 1}–${s.last + 1}`))
    .join("  ");
  return `${data.scheduler} · ${data.steps} steps · σ ${data.sigmas[0].toPrecision(3)}→0   ${spans}`;
}

function drawPreview(ctx, node, widgetWidth, y) {
  refresh(node);
  const { data, error } = node.dmPreview ?? {};
  const left = MARGIN;
  const width = widgetWidth - 2 * MARGIN;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(left, y, width, HEIGHT - 4);
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  if (data?.sigmas) {
    drawBars(ctx, data, left + 4, y + 4, width - 8, HEIGHT - 44);
    ctx.fillStyle = "#ddd";
    ctx.fillText(caption(data), left + 4, y + HEIGHT - 36, width - 8);
    ctx.fillStyle = "#999";
    ctx.fillText(data.source ?? "", left + 4, y + HEIGHT - 22, width - 8);
  }
  if (error) {
    ctx.fillStyle = "#e66";
    ctx.fillText(error, left + 4, y + (data?.sigmas ? 4 : HEIGHT / 2 - 6), width - 8);
  }
  ctx.restore();
}

function previewWidget(node) {
  return {
    name: WIDGET_NAME,
    type: "dm_sigma_preview",
    value: null,
    serialize: false,
    options: { serialize: false },
    draw: (ctx, drawnNode, widgetWidth, y) => drawPreview(ctx, drawnNode ?? node, widgetWidth, y),
    computeSize: (width) => [width, HEIGHT],
  };
}

// -- context menu: preview settings (node properties, never widgets) -------------------------------------

function setProperty(node, name, value) {
  node.properties ??= {};
  node.properties[name] = value;
  node.setDirtyCanvas(true, false);
}

function menuOptions(node) {
  const model = node.properties?.[PROP.model] || "auto";
  const nextModel = MODELS[(MODELS.indexOf(model) + 1) % MODELS.length];
  return [
    null,
    { content: `σ preview model: ${model} → ${nextModel}`, callback: () => setProperty(node, PROP.model, nextModel) },
    {
      content: "σ preview steps / scheduler / shift…",
      callback: () => {
        const answer = window.prompt(
          "steps, scheduler, shift (empty = from the connected sampler / defaults)",
          [node.properties?.[PROP.steps] ?? "", node.properties?.[PROP.scheduler] ?? "", node.properties?.[PROP.shift] ?? ""].join(", "),
        );
        if (answer == null) return;
        const [steps, scheduler, shift] = answer.split(",").map((part) => part.trim());
        setProperty(node, PROP.steps, steps ? Number(steps) : "");
        setProperty(node, PROP.scheduler, scheduler ?? "");
        if (shift) setProperty(node, PROP.shift, Number(shift));
      },
    },
  ];
}

app.registerExtension({
  name: "diffusion_merge.sigma_preview",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!ROUTING_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      this.addCustomWidget(previewWidget(this)); // last, so widgets_values keeps its positions
      this.setSize([Math.max(this.size[0], 320), this.computeSize()[1]]);
      return result;
    };
    const getExtraMenuOptions = nodeType.prototype.getExtraMenuOptions;
    nodeType.prototype.getExtraMenuOptions = function (canvas, options) {
      const result = getExtraMenuOptions?.apply(this, arguments);
      options.push(...menuOptions(this));
      return result;
    };
  },
});
