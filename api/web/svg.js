// Small SVG drawing helpers for the page's charts: elements, linear and log scales with round ticks, units.

const NS = "http://www.w3.org/2000/svg";

export function el(tag, attrs = {}, children = []) {
  const node = document.createElementNS(NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

export function text(x, y, content, attrs = {}) {
  return el("text", { x, y, ...attrs }, [String(content)]);
}

export function titled(node, tooltip) {
  node.append(el("title", {}, [tooltip]));
  return node;
}

// A fresh <svg> of `width` x `height` user units in `container` (its old content removed).
export function canvas(container, width, height) {
  const root = el("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
  container.replaceChildren(root);
  return root;
}

export function linear(domainMax, rangeStart, rangeEnd, domainMin = 0) {
  const span = domainMax - domainMin || 1;
  return (value) => rangeStart + ((value - domainMin) / span) * (rangeEnd - rangeStart);
}

export function log2Scale(domainMin, domainMax, rangeStart, rangeEnd) {
  const low = Math.log2(domainMin);
  const span = Math.log2(domainMax) - low || 1;
  return (value) => rangeStart + ((Math.log2(value) - low) / span) * (rangeEnd - rangeStart);
}

// About `count` round tick values from 0 (or `min`) to at least `max`: steps of 1, 2 or 5 x 10^k.
export function ticks(max, count = 5, min = 0) {
  if (!(max > min)) return [min];
  const raw = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((s) => s >= raw);
  const values = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) values.push(+v.toPrecision(12));
  return values;
}

export const GiB = 2 ** 30;

export function bytes(value) {
  return `${(value / GiB).toFixed(value >= 10 * GiB ? 1 : 2)} GiB`;
}

export function seconds(value) {
  if (value === 0) return "0";
  if (value >= 1) return `${value.toFixed(value >= 100 ? 0 : value >= 10 ? 1 : 2)} s`;
  if (value >= 1e-3) return `${(value * 1e3).toFixed(1)} ms`;
  return `${(value * 1e6).toFixed(0)} µs`;
}

export function dollars(value) {
  return value === 0 ? "$0" : `$${value.toPrecision(3)}`;
}

export function legend(entries) {
  const box = document.createElement("div");
  box.className = "legend";
  for (const [label, color] of entries) {
    const item = document.createElement("span");
    item.style.setProperty("--swatch", color);
    item.textContent = label;
    box.append(item);
  }
  return box;
}
