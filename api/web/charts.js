// The page's charts, each drawn as SVG from the service's answers: memory per stage, the step-time breakdown,
// the pipeline timeline, the error band, the GPU-count sweep and a loss curve. Marks carry data-* attributes with
// the numbers they draw, so a test (or a curious user) can read the chart back.

import { bytes, canvas, el, legend, linear, log2Scale, seconds, text, ticks, titled } from "./svg.js";

const MEMORY_PARTS = [
  ["params_bytes", "parameters", "#4c78a8"],
  ["grads_bytes", "gradients", "#72b7b2"],
  ["optimizer_bytes", "optimizer states", "#f58518"],
  ["activations_bytes", "activations", "#e45756"],
  ["other_bytes", "other", "#b8b0ac"],
];

const BREAKDOWN_TERMS = [
  ["compute_s", "compute", "#4c78a8"],
  ["tp_comm_s", "TP comm", "#72b7b2"],
  ["cp_comm_s", "CP comm", "#54a24b"],
  ["ep_comm_s", "EP all-to-all", "#9d755d"],
  ["pp_comm_s", "PP comm", "#eeca3b"],
  ["dp_comm_s", "DP comm (exposed)", "#f58518"],
  ["bubble_s", "pipeline bubble", "#d3d3d3"],
  ["accumulation_s", "grad accumulation", "#ff9da6"],
  ["optimizer_s", "optimizer", "#b279a2"],
];

const TASK_COLORS = { forward: "#4c78a8", backward: "#f58518", recompute: "#e45756" };

function yAxis(svg, scale, values, x, width, format) {
  for (const value of values) {
    const y = scale(value);
    svg.append(el("line", { x1: x, x2: x + width, y1: y, y2: y, stroke: "#eceff3" }));
    svg.append(text(x - 4, y + 3, format(value), { "text-anchor": "end" }));
  }
}

// One stacked bar per pipeline stage (the per-GPU bytes of that stage), with the search's usable limit and the
// GPU's capacity as lines across.
export function memoryChart(container, memory, limitBytes) {
  const stages = memory.by_stage;
  const [width, height, left, top, bottom] = [560, 260, 64, 12, 34];
  const svg = canvas(container, width, height);
  const top_value = Math.max(memory.capacity_bytes, ...stages.map((s) => s.total_bytes));
  const y = linear(top_value * 1.05, height - bottom, top);
  yAxis(svg, y, ticks(top_value / 2 ** 30, 5).map((g) => g * 2 ** 30), left, width - left - 8, bytes);
  const slot = (width - left - 8) / stages.length;
  const barWidth = Math.min(60, slot * 0.7);
  stages.forEach((stage, index) => {
    const x = left + slot * index + (slot - barWidth) / 2;
    let base = 0;
    for (const [key, label, color] of MEMORY_PARTS) {
      const value = stage[key] || 0;
      const rect = el("rect", { class: "segment", x, width: barWidth, y: y(base + value), height: y(base) - y(base + value),
        fill: color, "data-part": key, "data-bytes": value, "data-stage": stage.stage });
      svg.append(titled(rect, `stage ${stage.stage}: ${label} ${bytes(value)}`));
      base += value;
    }
    if (stages.length <= 32 || index % Math.ceil(stages.length / 32) === 0) {
      svg.append(text(x + barWidth / 2, height - bottom + 14, stage.stage, { "text-anchor": "middle" }));
    }
  });
  svg.append(text(left + (width - left) / 2, height - 4, "pipeline stage", { "text-anchor": "middle" }));
  // The capacity's label above its line, the limit's below its own: the two lines are often close.
  const lines = [[memory.capacity_bytes, "GPU memory", "#333", "", -3]];
  if (limitBytes) lines.push([limitBytes, "usable limit", "#c0392b", "5 4", 11]);
  for (const [value, label, color, dash, offset] of lines) {
    svg.append(el("line", { class: "limit", x1: left, x2: width - 8, y1: y(value), y2: y(value), stroke: color,
      "stroke-dasharray": dash, "data-bytes": value }));
    svg.append(text(width - 10, y(value) + offset, `${label} ${bytes(value)}`, { "text-anchor": "end", fill: color }));
  }
  container.append(legend(MEMORY_PARTS.map(([, label, color]) => [label, color])));
}

// The step time as one horizontal stacked bar of its terms, then each term's seconds.
export function breakdownChart(container, breakdown, stepTime) {
  const [width, height, left] = [560, 130, 8];
  const svg = canvas(container, width, height);
  const total = BREAKDOWN_TERMS.reduce((sum, [key]) => sum + (breakdown[key] || 0), 0) || 1;
  const x = linear(total, left, width - 8);
  let start = 0;
  for (const [key, label, color] of BREAKDOWN_TERMS) {
    const value = breakdown[key] || 0;
    if (value <= 0) continue;
    const rect = el("rect", { class: "term", x: x(start), y: 10, width: x(start + value) - x(start), height: 34,
      fill: color, "data-term": key, "data-seconds": value });
    svg.append(titled(rect, `${label}: ${seconds(value)}`));
    start += value;
  }
  const shown = BREAKDOWN_TERMS.filter(([key]) => (breakdown[key] || 0) > 0);
  shown.forEach(([key, label, color], index) => {
    const row = 64 + 16 * Math.floor(index / 2);
    const column = left + 276 * (index % 2);
    svg.append(el("rect", { x: column, y: row - 9, width: 10, height: 10, fill: color }));
    const share = ((breakdown[key] / total) * 100).toFixed(1);
    svg.append(text(column + 14, row, `${label} ${seconds(breakdown[key])} (${share}%)`));
  });
  svg.append(text(width - 8, height - 4, `step ${seconds(stepTime)}`, { "text-anchor": "end" }));
}

// One row per pipeline device, one box per task (forward, recompute, backward of a micro-batch on a chunk); the
// light background shows through the gaps: the bubble. Each row is labelled with its idle share.
export function timelineChart(container, timeline) {
  const devices = Math.max(...timeline.tasks.map((t) => t.device)) + 1;
  const end = Math.max(...timeline.tasks.map((t) => t.end_s));
  const [width, left, rowHeight, top] = [1100, 110, 22, 8];
  const height = top + devices * rowHeight + 30;
  const svg = canvas(container, width, height);
  const x = linear(end, left, width - 10);
  const busy = new Array(devices).fill(0);
  for (const task of timeline.tasks) busy[task.device] += task.end_s - task.start_s;
  for (let device = 0; device < devices; device += 1) {
    const y = top + device * rowHeight;
    svg.append(el("rect", { class: "bubble", x: left, y, width: width - 10 - left, height: rowHeight - 4, fill: "#eef0f3",
      "data-device": device, "data-idle-s": end - busy[device] }));
    const idle = ((1 - busy[device] / end) * 100).toFixed(1);
    svg.append(text(left - 6, y + rowHeight / 2 + 1, `stage ${device} · idle ${idle}%`, { "text-anchor": "end" }));
  }
  for (const task of timeline.tasks) {
    const rect = el("rect", { class: "task", x: x(task.start_s), y: top + task.device * rowHeight,
      width: Math.max(0.5, x(task.end_s) - x(task.start_s)), height: rowHeight - 4, fill: TASK_COLORS[task.kind] || "#888",
      stroke: "#fff", "stroke-width": 0.3, "data-kind": task.kind, "data-device": task.device });
    svg.append(titled(rect, `${task.kind} of micro-batch ${task.microbatch} (chunk ${task.chunk}) on stage ${task.device}: `
      + `${seconds(task.start_s)} to ${seconds(task.end_s)}`));
  }
  for (const tick of ticks(end, 8)) {
    svg.append(text(x(tick), height - 8, seconds(tick), { "text-anchor": "middle" }));
  }
  container.append(legend([["forward", TASK_COLORS.forward], ["backward", TASK_COLORS.backward],
    ["recompute", TASK_COLORS.recompute], ["idle (bubble)", "#eef0f3"]]));
}

// The predicted step time with the band the validated runs of its regime give (or why there is none yet).
export function errorBand(container, estimate) {
  const band = estimate.uncertainty || {};
  const low = band.step_time_low_s;
  const high = band.step_time_high_s;
  const step = estimate.step_time_s;
  const [width, height] = [560, 90];
  const svg = canvas(container, width, height);
  if (low == null || high == null) {
    svg.append(text(8, 30, `${seconds(step)} per step: no band yet`, { class: "no-band" }));
    svg.append(text(8, 50, band.step_time_basis || "no validated runs of this regime"));
    return;
  }
  const x = linear(high * 1.1, 20, width - 20, Math.min(low, step) * 0.9);
  svg.append(el("rect", { class: "band", x: x(low), y: 20, width: x(high) - x(low), height: 20, fill: "#c6dbef",
    "data-low-s": low, "data-high-s": high }));
  svg.append(el("line", { x1: x(step), x2: x(step), y1: 14, y2: 46, stroke: "#1d2430", "stroke-width": 2 }));
  svg.append(text(x(low), 58, seconds(low), { "text-anchor": "middle" }));
  svg.append(text(x(high), 58, seconds(high), { "text-anchor": "middle" }));
  svg.append(text(x(step), 10, `predicted ${seconds(step)}`, { "text-anchor": "middle" }));
  const coverage = Math.round((band.coverage || 0) * 100);
  svg.append(text(8, 80, `${coverage}% band from ${band.step_time_runs} validated runs (${band.regime}, ${band.scale})`));
}

// Points (GPU count, value) on a log2 x-axis; the Pareto front filled and joined, the others hollow.
export function sweepChart(container, points, valueOf, format) {
  const shown = points.filter((p) => p.best);
  const [width, height, left, bottom] = [560, 260, 70, 34];
  const svg = canvas(container, width, height);
  if (!shown.length) {
    svg.append(text(10, 30, "no plan fits at any of these GPU counts"));
    return;
  }
  const gpus = shown.map((p) => p.num_gpus);
  const values = shown.map(valueOf);
  const x = log2Scale(Math.min(...gpus) / 1.4, Math.max(...gpus) * 1.4, left, width - 12);
  const y = linear(Math.max(...values) * 1.1, height - bottom, 10);
  yAxis(svg, y, ticks(Math.max(...values) * 1.1, 5), left, width - left - 12, format);
  for (const count of gpus) svg.append(text(x(count), height - bottom + 14, count, { "text-anchor": "middle" }));
  svg.append(text(left + (width - left) / 2, height - 4, "GPUs", { "text-anchor": "middle" }));
  const front = shown.filter((p) => p.pareto);
  svg.append(el("polyline", { points: front.map((p) => `${x(p.num_gpus)},${y(valueOf(p))}`).join(" "), fill: "none",
    stroke: "#2f6fdb", "stroke-width": 1.5 }));
  for (const point of shown) {
    const dot = el("circle", { class: "point", cx: x(point.num_gpus), cy: y(valueOf(point)), r: 5, stroke: "#2f6fdb",
      "stroke-width": 1.5, fill: point.pareto ? "#2f6fdb" : "#fff", "data-gpus": point.num_gpus,
      "data-value": valueOf(point), "data-pareto": point.pareto });
    svg.append(titled(dot, `${point.num_gpus} GPUs: ${format(valueOf(point))}`));
  }
}

// A line through (x, y) pairs: a training job's loss per step.
export function lineChart(container, xs, ys, label) {
  const [width, height, left, bottom] = [560, 240, 56, 30];
  const svg = canvas(container, width, height);
  if (!xs.length) {
    svg.append(text(10, 30, "no steps yet"));
    return;
  }
  const [low, high] = [Math.min(...ys), Math.max(...ys)];
  const pad = (high - low) * 0.1 || Math.abs(high) * 0.1 || 1;
  const x = linear(Math.max(...xs), left, width - 10, Math.min(...xs));
  const y = linear(high + pad, height - bottom, 10, low - pad);
  yAxis(svg, y, ticks(high + pad, 5, low - pad), left, width - left - 10, (v) => v.toPrecision(3));
  svg.append(el("polyline", { class: "curve", points: xs.map((v, i) => `${x(v)},${y(ys[i])}`).join(" "), fill: "none",
    stroke: "#e45756", "stroke-width": 1.8, "data-points": xs.length }));
  for (const tick of ticks(Math.max(...xs), 6, Math.min(...xs))) {
    svg.append(text(x(tick), height - bottom + 14, tick, { "text-anchor": "middle" }));
  }
  svg.append(text(left + (width - left) / 2, height - 2, label, { "text-anchor": "middle" }));
}
