// diffusion-merge: a small plot of a SuperDiff run on the node (SuperDiff KSampler, SuperDiff Trace).
// The node's ui message carries the κ and log-density traces (merging.sampling.superdiff.SuperDiffTrace.plot_data);
// two panels are drawn on the canvas below the widgets: κ per component and step, and each component's
// log-density estimate relative to the components' mean. Nothing is added to the node's widgets, so saved
// workflows keep exactly their widgets_values.
import { app } from "../../../scripts/app.js";

const PLOT_NODES = new Set(["DM_SuperDiffKSampler", "DM_SuperDiffTrace"]);
const UI_KEY = "superdiff_trace";
const PANEL_HEIGHT = 90;
const CAPTION_HEIGHT = 16;
const MARGIN = 8;
const MIN_WIDTH = 320;
const COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#b07aa1", "#76b7b2", "#edc948", "#ff9da7"];

function plotHeight() {
  return 2 * (PANEL_HEIGHT + CAPTION_HEIGHT) + 3 * MARGIN;
}

function plotTop(node) {
  return node.computeSize()[1];
}

function fit(node) {
  const needed = plotTop(node) + plotHeight();
  if (node.size[1] < needed || node.size[0] < MIN_WIDTH) {
    node.setSize([Math.max(node.size[0], MIN_WIDTH), Math.max(node.size[1], needed)]);
  }
}

// [low, high] over every finite value of series[sample][step][component], padded when flat.
function range(series, fixed) {
  let low = fixed ? fixed[0] : Infinity;
  let high = fixed ? fixed[1] : -Infinity;
  for (const sample of series) for (const step of sample) for (const v of step) {
    if (v == null || !Number.isFinite(v)) continue;
    low = Math.min(low, v);
    high = Math.max(high, v);
  }
  if (!Number.isFinite(low)) return [0, 1];
  if (high - low < 1e-9) return [low - 0.5, high + 0.5];
  return [low, high];
}

function drawPanel(ctx, box, steps, series, fixedRange, title) {
  const [low, high] = range(series, fixedRange);
  const last = Math.max(1, steps[steps.length - 1] ?? 1);
  const x = (step) => box.left + (step / last) * box.width;
  const y = (v) => box.top + box.height - ((v - low) / (high - low)) * box.height;
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(box.left, box.top, box.width, box.height);
  if (low < 0 && high > 0) {
    ctx.strokeStyle = "#444";
    ctx.beginPath();
    ctx.moveTo(box.left, y(0));
    ctx.lineTo(box.left + box.width, y(0));
    ctx.stroke();
  }
  series.forEach((sample, index) => {
    ctx.globalAlpha = index === 0 ? 1.0 : 0.35;
    const components = sample[0]?.length ?? 0;
    for (let c = 0; c < components; c++) {
      ctx.strokeStyle = COLORS[c % COLORS.length];
      ctx.beginPath();
      let started = false;
      sample.forEach((values, i) => {
        const v = values[c];
        if (v == null || !Number.isFinite(v)) return;
        if (started) ctx.lineTo(x(steps[i]), y(v));
        else ctx.moveTo(x(steps[i]), y(v));
        started = true;
      });
      ctx.stroke();
    }
  });
  ctx.globalAlpha = 1.0;
  ctx.fillStyle = "#ccc";
  ctx.fillText(`${title}   [${low.toPrecision(3)}, ${high.toPrecision(3)}]`, box.left, box.top + box.height + 3, box.width);
}

function drawPlot(node, ctx) {
  const data = node.dmSuperDiff;
  if (!data || node.flags?.collapsed) return;
  const top = plotTop(node);
  const width = node.size[0] - 2 * MARGIN;
  ctx.save();
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.lineWidth = 1.5;
  const kappaBox = { left: MARGIN, top: top + MARGIN, width, height: PANEL_HEIGHT };
  const densityBox = { left: MARGIN, top: kappaBox.top + PANEL_HEIGHT + CAPTION_HEIGHT + MARGIN, width, height: PANEL_HEIGHT };
  const kappaRange = data.mode === "OR" ? [0, 1] : null;
  drawPanel(ctx, kappaBox, data.kappa_steps, data.kappa, kappaRange, `κ per step (${data.mode}, ${data.steps} steps)`);
  drawPanel(ctx, densityBox, data.density_steps, data.log_density, null, "log q − mean (nats)");
  const legend = (data.labels ?? []).map((label, c) => ({ label, color: COLORS[c % COLORS.length] }));
  let left = MARGIN + 4;
  for (const { label, color } of legend) {
    ctx.fillStyle = color;
    ctx.fillText(label, left, kappaBox.top + 3);
    left += ctx.measureText?.(label)?.width + 12 || 80;
  }
  ctx.restore();
}

app.registerExtension({
  name: "diffusion_merge.superdiff_plot",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!PLOT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const data = message?.[UI_KEY]?.[0];
      if (!data) return;
      this.dmSuperDiff = data;
      fit(this);
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      drawPlot(this, ctx);
    };
  },
});
