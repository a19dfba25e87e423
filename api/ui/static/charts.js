// Line charts drawn as SVG: one polyline per series (every point of the series is a
// vertex, so the count can be checked), a left and an optional right axis.

import { fmtNumber, h, s } from "./dom.js";

const WIDTH = 720;
const HEIGHT = 280;
const PAD = { left: 64, right: 64, top: 16, bottom: 40 };
const MAX_MARKERS = 150; // dots on every point up to this many, a bare line beyond

function niceTicks(min, max, count = 5) {
  const span = max - min;
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((v) => span / v <= count);
  const ticks = [];
  for (let v = Math.ceil(min / step) * step; v <= max + step * 1e-9; v += step) {
    ticks.push(Number(v.toPrecision(12)));
  }
  return ticks;
}

function domain(values) {
  let min = Math.min(...values);
  let max = Math.max(...values);
  if (!Number.isFinite(min) || !Number.isFinite(max)) return [0, 1];
  if (min === max) {
    const pad = Math.abs(min) * 0.1 || 1;
    return [min - pad, max + pad];
  }
  const pad = (max - min) * 0.05;
  return [min - pad, max + pad];
}

function scale([d0, d1], [r0, r1]) {
  return (v) => r0 + ((v - d0) / (d1 - d0)) * (r1 - r0);
}

/**
 * series: [{name, label, points: [{x, y}], axis: "left" | "right"}]
 * Returns a <figure> with the SVG and a legend; empty series are left out of the drawing
 * but named in the legend as "no points yet"; `empty` is the text when nothing is drawn;
 * `leftDomain` ([min, max]) fixes the left axis (shares: [0, 1]).
 */
export function lineChart({ id, title, series, xLabel, leftLabel, rightLabel, empty, leftDomain }) {
  const drawn = series.filter((sr) => sr.points.length > 0);
  const figure = h("figure", { class: "chart", id });
  figure.append(h("figcaption", {}, title));
  if (drawn.length === 0) {
    figure.append(h("p", { class: "muted" }, empty || "No points yet."));
    return figure;
  }
  const finite = (pts) => pts.filter((p) => Number.isFinite(p.y));
  const xs = drawn.flatMap((sr) => sr.points.map((p) => p.x));
  const left = drawn.filter((sr) => sr.axis !== "right");
  const right = drawn.filter((sr) => sr.axis === "right");
  const plot = [PAD.left, WIDTH - PAD.right];
  const xDomain = domain(xs);
  const x = scale(xDomain, plot);
  const axes = {};
  if (left.length) axes.left = leftDomain || domain(left.flatMap((sr) => finite(sr.points).map((p) => p.y)));
  if (right.length) axes.right = domain(right.flatMap((sr) => finite(sr.points).map((p) => p.y)));
  const yScale = (axis) => scale(axes[axis], [HEIGHT - PAD.bottom, PAD.top]);

  const svg = s("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    role: "img",
    "aria-label": title,
    "data-chart": id,
  });
  const grid = s("g", { class: "grid" });
  const labels = s("g", { class: "ticks" });
  for (const tick of niceTicks(xDomain[0], xDomain[1], 8)) {
    const px = x(tick);
    grid.append(s("line", { x1: px, x2: px, y1: PAD.top, y2: HEIGHT - PAD.bottom }));
    labels.append(
      s("text", { x: px, y: HEIGHT - PAD.bottom + 16, "text-anchor": "middle" }, fmtNumber(tick)),
    );
  }
  for (const [axis, range] of Object.entries(axes)) {
    const y = yScale(axis);
    const atX = axis === "left" ? PAD.left - 6 : WIDTH - PAD.right + 6;
    for (const tick of niceTicks(range[0], range[1], 5)) {
      const py = y(tick);
      if (axis === "left") grid.append(s("line", { x1: plot[0], x2: plot[1], y1: py, y2: py }));
      labels.append(
        s(
          "text",
          { x: atX, y: py + 4, "text-anchor": axis === "left" ? "end" : "start" },
          fmtNumber(tick),
        ),
      );
    }
  }
  svg.append(grid, labels);
  svg.append(
    s("rect", {
      class: "frame",
      x: plot[0],
      y: PAD.top,
      width: plot[1] - plot[0],
      height: HEIGHT - PAD.top - PAD.bottom,
    }),
    s("text", { class: "axis-label", x: WIDTH / 2, y: HEIGHT - 6, "text-anchor": "middle" }, xLabel),
  );
  if (leftLabel && axes.left) {
    svg.append(
      s(
        "text",
        {
          class: "axis-label",
          transform: `translate(14 ${HEIGHT / 2}) rotate(-90)`,
          "text-anchor": "middle",
        },
        leftLabel,
      ),
    );
  }
  if (rightLabel && axes.right) {
    svg.append(
      s(
        "text",
        {
          class: "axis-label",
          transform: `translate(${WIDTH - 10} ${HEIGHT / 2}) rotate(90)`,
          "text-anchor": "middle",
        },
        rightLabel,
      ),
    );
  }

  const legend = h("ul", { class: "legend" });
  series.forEach((sr, index) => {
    const color = `c${index % 8}`;
    const count = sr.points.length;
    legend.append(
      h(
        "li",
        {},
        h("span", { class: `swatch ${color}${sr.axis === "right" ? " dashed" : ""}` }),
        `${sr.label} `,
        h("span", { class: "muted" }, count ? `(${count}${sr.axis === "right" ? ", right axis" : ""})` : "(no points yet)"),
      ),
    );
    if (!count) return;
    const y = yScale(sr.axis === "right" ? "right" : "left");
    const coords = sr.points
      .filter((p) => Number.isFinite(p.y))
      .map((p) => `${x(p.x).toFixed(1)},${y(p.y).toFixed(1)}`);
    const group = s("g", { class: `series ${color}`, "data-series": sr.name, "data-count": count });
    group.append(
      s("polyline", {
        class: sr.axis === "right" ? "line dashed" : "line",
        points: coords.join(" "),
        "data-series": sr.name,
      }),
    );
    if (count <= MAX_MARKERS) {
      for (const p of sr.points) {
        if (!Number.isFinite(p.y)) continue;
        group.append(
          s(
            "circle",
            { cx: x(p.x).toFixed(1), cy: y(p.y).toFixed(1), r: 2.5 },
            s("title", {}, `${sr.label} at step ${p.x}: ${fmtNumber(p.y)}`),
          ),
        );
      }
    }
    svg.append(group);
  });
  figure.append(svg, legend);
  return figure;
}
