// diffusion-merge: show node results (task-vector summaries, saved paths) on the node itself.
// The text is drawn on the canvas and kept off the node's widgets, so saved workflows are unchanged.
import { app } from "../../../scripts/app.js";

const RESULT_NODES = new Set(["DM_TaskVectorInfo", "DM_TaskVectorSave", "DM_SaveCheckpointStreaming", "DM_ModelBlocks"]);
const LINE_HEIGHT = 15;
const MARGIN = 8;
const MIN_WIDTH = 300;

function resultLines(message) {
  const text = message?.text;
  if (!text) return [];
  return (Array.isArray(text) ? text : [text]).join("\n").split("\n");
}

function textTop(node) {
  return node.computeSize()[1];
}

function fitToText(node) {
  const needed = textTop(node) + node.dmResultLines.length * LINE_HEIGHT + MARGIN;
  if (node.size[1] < needed || node.size[0] < MIN_WIDTH) {
    node.setSize([Math.max(node.size[0], MIN_WIDTH), Math.max(node.size[1], needed)]);
  }
}

function drawResult(node, ctx) {
  const lines = node.dmResultLines;
  if (!lines?.length || node.flags?.collapsed) return;
  ctx.save();
  ctx.font = "12px monospace";
  ctx.fillStyle = LiteGraph.WIDGET_TEXT_COLOR ?? "#ddd";
  ctx.textBaseline = "top";
  const top = textTop(node);
  lines.forEach((line, i) => ctx.fillText(line, MARGIN, top + i * LINE_HEIGHT, node.size[0] - 2 * MARGIN));
  ctx.restore();
}

app.registerExtension({
  name: "diffusion_merge.node_results",
  beforeRegisterNodeDef(nodeType, nodeData) {
    if (!RESULT_NODES.has(nodeData.name)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      this.dmResultLines = resultLines(message);
      fitToText(this);
      this.setDirtyCanvas(true, true);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      onDrawForeground?.apply(this, arguments);
      drawResult(this, ctx);
    };
  },
});
