// Draws the per-block charts with uPlot from the JSON each <figure data-chart> carries, and keeps
// them across htmx refreshes: a refreshed fragment brings new JSON, the existing plot moves into the
// new figure and only its data changes (so zoom and hidden series survive the 2-second polling).
(function () {
  "use strict";

  // Okabe-Ito colours: distinguishable with colour-blindness, dark enough on white.
  const PALETTE = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#56b4e9", "#e69f00", "#000000", "#7f7f7f"];
  const HEIGHT = 260;
  const plots = new Map();
  window.swqPlots = plots;

  function formatNumber(value) {
    if (value == null) return "—";
    const abs = Math.abs(value);
    if (abs !== 0 && (abs < 1e-3 || abs >= 1e5)) return value.toExponential(2).replace(/\.?0+e/, "e");
    return Number(value.toPrecision(4)).toString();
  }

  function plotData(spec) {
    return [spec.x, ...spec.series.map((s) => s.values)];
  }

  function plotOptions(spec, width) {
    return {
      width: width,
      height: HEIGHT,
      scales: {
        x: { time: false },
        // bars stand on zero, so their heights compare
        y: spec.series.some((s) => s.bars) ? { range: (u, min, max) => [0, max * 1.05] } : { distr: spec.log ? 3 : 1 },
      },
      cursor: { drag: { x: true, y: false } },
      axes: [
        {
          label: spec.x_label || "block",
          stroke: "#333",
          grid: { stroke: "#e6e6e6" },
          incrs: [1, 2, 5, 10, 20, 50, 100],
          values: (u, ticks) => ticks.map((t) => (Number.isInteger(t) ? String(t) : "")),
        },
        {
          label: spec.y_label + (spec.log ? " (log)" : ""),
          stroke: "#333",
          grid: { stroke: "#e6e6e6" },
          size: 64,
          values: (u, ticks) => ticks.map(formatNumber),
        },
      ],
      series: [
        { label: spec.x_label || "block", value: (u, v) => (v == null ? "—" : String(v)) },
        ...spec.series.map((s) => ({
          label: s.label,
          stroke: PALETTE[(s.color || 0) % PALETTE.length],
          width: 2,
          dash: s.dash ? [6, 4] : undefined,
          paths: s.bars ? uPlot.paths.bars({ size: [0.6, 40] }) : undefined,
          fill: s.bars ? PALETTE[(s.color || 0) % PALETTE.length] : undefined,
          points: { show: !s.bars, size: 6 },
          value: (u, v) => formatNumber(v),
        })),
      ],
    };
  }

  function sameShape(plot, spec) {
    return plot.series.length === spec.series.length + 1 && plot.swqLog === spec.log;
  }

  function draw(figure) {
    const slot = figure.querySelector(".chart-plot");
    const source = figure.querySelector("script.chart-data");
    if (!slot || !source || typeof uPlot === "undefined") return;
    const spec = JSON.parse(source.textContent);
    const width = Math.max(280, slot.clientWidth || figure.clientWidth);
    let plot = plots.get(figure.id);
    if (plot && sameShape(plot, spec)) {
      slot.replaceChildren(plot.root);
      plot.setData(plotData(spec));
      plot.setSize({ width: width, height: HEIGHT });
    } else {
      if (plot) plot.destroy();
      slot.replaceChildren();
      plot = new uPlot(plotOptions(spec, width), plotData(spec), slot);
      plot.swqLog = spec.log;
      plots.set(figure.id, plot);
    }
    figure.dataset.points = String(spec.x.length);
  }

  function drawAll(root) {
    (root || document).querySelectorAll("figure[data-chart]").forEach(draw);
  }

  let resizeTimer = null;
  window.addEventListener("resize", () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => {
      document.querySelectorAll("figure[data-chart]").forEach((figure) => {
        const plot = plots.get(figure.id);
        const slot = figure.querySelector(".chart-plot");
        if (plot && slot) plot.setSize({ width: Math.max(280, slot.clientWidth), height: HEIGHT });
      });
    }, 150);
  });

  document.addEventListener("DOMContentLoaded", () => drawAll(document));
  // afterSwap runs before the browser paints the new fragment: no empty frame between two charts.
  document.addEventListener("htmx:afterSwap", () => drawAll(document));
})();
